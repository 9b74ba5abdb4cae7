"""What runs in each process the supervisor (workers.py) starts, spawned: a worker, and the
inference process of ``--inference shared``.

A worker loads its model before it listens, then reports "serving" on its pipe; the inference
process reports once its backend is loaded. Each drains on SIGTERM; SIGINT is the
supervisor's alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from ..settings import ServerSettings

if TYPE_CHECKING:
    from ..backends.base import Backend
    from .shared_inference import InferenceLink

# A picklable factory (prepared ONNX path -> Backend), for benchmarks and tests.
BackendFactory = Callable[[Path], "Backend"]
# What a process sends on its pipe once it serves.
SERVING = "serving"

logger = logging.getLogger(__name__)


async def _run_worker(
    settings: ServerSettings,
    report: Connection,
    inference: tuple[InferenceLink, int] | None = None,
    factory: BackendFactory | None = None,
    board: tuple[Path, int] | None = None,
) -> int:
    """One worker: load, then listen on the shared port, serve until SIGTERM, drain."""
    from .app import FramecastServer, freeze_loaded

    server = FramecastServer(
        settings,
        reuse_port=True,
        shared_metrics=True,
        inference=inference,
        backend_factory=factory,
        stream_board=board,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    load = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not load.done():
        load.cancel()
        await server.stop(0)
        return 0
    if load.exception() is not None:
        stopping.cancel()
        await server.stop(0)
        logger.error("could not load the model: %s", load.exception())
        return 1
    # Listening only now: connections reach workers that can answer them.
    await server.start()
    freeze_loaded()
    report.send((SERVING, os.getpid()))
    await stopping
    logger.info("draining (grace %.0f s)", settings.grace_s)
    await server.stop()
    return 0


def worker_main(
    settings: ServerSettings,
    index: int,
    report: Connection,
    level: int,
    link: InferenceLink | None = None,
    factory: BackendFactory | None = None,
    board: Path | None = None,
) -> None:
    """The entry point of a worker process (spawned: nothing is inherited but the arguments)."""
    from .event_loop import run

    # The terminal's Ctrl-C reaches the whole process group: the supervisor alone decides,
    # and asks each worker with SIGTERM, once.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s worker {index} %(name)s: %(message)s",
    )
    inference = None if link is None else (link, index)
    seat = None if board is None else (board, index)
    raise SystemExit(run(_run_worker(settings, report, inference, None if link else factory, seat)))


async def _run_inference(
    settings: ServerSettings,
    link: InferenceLink,
    factory: BackendFactory | None,
    report: Connection,
) -> int:
    """The inference process: load the backend, serve the front ends until SIGTERM."""
    from ..core.batcher import BatcherSettings
    from ..model import prepare_model
    from .app import freeze_loaded
    from .shared_inference import InferenceService

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    prepared = await asyncio.to_thread(
        prepare_model, settings.model, settings.cache_dir, allow_download=settings.allow_download
    )
    if factory is not None:
        backend = await asyncio.to_thread(factory, prepared.onnx_path)
    else:
        backend = await asyncio.to_thread(settings.create_backend, prepared.onnx_path)
    recorder = None
    if settings.metrics_port is not None:
        # Batch sizes and times are known only here: this process writes them to the
        # supervisor's metrics directory like a worker.
        from ..metrics import Metrics

        # Its queue gauges (never set here) must combine as the front ends' do, or the
        # collector's merge would take whichever mode it read last and sum the front ends.
        recorder = Metrics(max_batch=settings.max_batch, shared=True, host_wide_batcher=True)
    service = InferenceService(
        link,
        backend,
        BatcherSettings(
            max_batch=settings.max_batch,
            max_delay_us=settings.max_delay_us,
            max_queue=settings.max_queue,
            memory_budget_bytes=settings.memory_budget_bytes,
        ),
        input_size=prepared.preset.input_size,
        recorder=recorder,
    )
    await service.start()
    freeze_loaded()
    report.send((SERVING, os.getpid()))
    logger.info("inference process serving %d front ends on %s", link.front_ends, backend.info.name)
    await stop.wait()
    await service.close()
    backend.close()
    return 0


def inference_main(
    settings: ServerSettings,
    link: InferenceLink,
    factory: BackendFactory | None,
    report: Connection,
    level: int,
) -> None:
    """The entry point of the inference process of ``--inference shared``."""
    from .event_loop import run

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s inference %(name)s: %(message)s"
    )
    raise SystemExit(run(_run_inference(settings, link, factory, report)))
