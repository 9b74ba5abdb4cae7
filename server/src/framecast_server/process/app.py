"""The server process: gRPC wiring, health, reflection, loading, and graceful shutdown.

Shutdown drains (see :meth:`FramecastServer.stop`): health turns NOT_SERVING and stays
answerable for the drain delay while calls are still served; then streams stop reading, answer
what they hold and end UNAVAILABLE (the SDK reconnects); new unary calls are still served until
none has arrived for a moment (clients that watch health have gone elsewhere), and only then
refused (UNAVAILABLE); the server stops once every call has left, or when the grace period
ends. gRPC's own stop is called only then: it cancels calls it has received but not yet handed
to a handler (it says GOAWAY, but grpc.aio stops taking calls at once), and by then there are
none of ours. That is also why the drain cannot begin with gRPC's stop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from framecast_oip._proto import open_inference_pb2 as oip_pb
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ..backends.base import Backend, BreakableBackend
from ..core.admission import CALLS_BESIDE_OTHERS, PRESENCE_S, Admission
from ..core.batcher import Batcher, BatcherSettings
from ..core.drain import CallGate
from ..core.memory import MemoryTrimmer
from ..core.runtime import BatcherLike, ServingModel
from ..model import prepare_model
from ..service.classifier import SERVICE_NAME, ClassifierServicer
from ..service.handlers import guarded
from ..service.inference_protocol import InferenceServicer
from ..service.reflection import add_reflection
from ..settings import ServerSettings
from .inference_away import InferenceAway
from .transport import ACCEPT_LOOPS, server_options
from .wiring import Wiring

if TYPE_CHECKING:
    from .shared_inference import InferenceLink

logger = logging.getLogger(__name__)

__all__ = [
    "OIP_SERVICE_NAME",
    "SERVICE_NAME",
    "FramecastServer",
    "ModelLoadError",
    "freeze_loaded",
    "serve",
]
OIP_SERVICE_NAME = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The unary inference calls a front end refuses while the inference process is away.
_UNARY_INFERENCE = frozenset({f"/{SERVICE_NAME}/Classify", f"/{OIP_SERVICE_NAME}/ModelInfer"})
# After every call of ours has ended, what is left (health watches, reflection) gets this long.
FINAL_STOP_GRACE_S = 0.25
# Once draining, new calls are served until none has arrived for QUIET_S (at most SERVE_CAP_S:
# clients that watch health leave within a round trip; the others are refused after it), then
# refused; before gRPC's own stop (which cancels calls that arrive meanwhile), the server waits
# until refused clients have gone quiet for as long, at most QUIET_CAP_S.
QUIET_S, SERVE_CAP_S, QUIET_CAP_S = 0.5, 1.0, 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Logged during a drain when new calls begin to be refused (calls stopped arriving, or the cap).
REFUSING = "refusing new calls"
# Logged once every call has left during a drain, just before the port closes.
ALL_CALLS_ANSWERED = "every call answered"
# serve()'s exit status when the backend broke for good (a sticky CUDA error): restart me.
EXIT_BACKEND_BROKEN = 3


class ModelLoadError(Exception):
    """serve() could not load the model after the server started listening."""


class FramecastServer:
    """One Framecast gRPC server: start() binds and answers health, load() brings the model up.

    Between the two, health says NOT_SERVING and Classifier calls get UNAVAILABLE, so load
    balancers and clients can tell a loading server from a dead one.

    About 300 lines, kept whole on purpose: it is the lifecycle (start, load, drain, stop) and
    each step changes the health every other step reads; what the settings add is in
    wiring.py, the servicers in service/.
    """

    def __init__(
        self,
        settings: ServerSettings,
        *,
        backend_factory: Callable[[Path], Backend] | None = None,
        reuse_port: bool = False,
        shared_metrics: bool = False,
        inference: tuple[InferenceLink, int] | None = None,
        stream_board: tuple[Path, int] | None = None,
    ) -> None:
        """backend_factory (prepared ONNX path -> Backend) replaces settings.backend, for tests.

        reuse_port: share the port with other processes on purpose (the workers of
        ``--workers``, see workers.py); otherwise a second server on a taken port fails.
        shared_metrics: a worker's metrics go to the supervisor, which serves /metrics.
        inference: (link, index): a front end of ``--inference shared``; its frames go to the
        inference process (shared_inference/), which owns the backend and the one batcher.
        stream_board: (directory, index): a worker's streams go there, and ListStreams lists
        every worker's (service/stream_board.py).
        """
        self.settings = settings
        self._backend_factory = backend_factory
        self._inference = inference
        # A front end of --inference shared: True while the inference process is away.
        self._inference_away = False
        self._reuse_port = reuse_port
        self.port: int | None = None
        # TLS, tokens and metrics, as the settings ask (raises ValueError for a bad token file).
        # A front end's batcher figures are the inference process's, the host's: not summed.
        self.wiring = Wiring.for_settings(
            settings, shared_metrics=shared_metrics, host_wide_batcher=inference is not None
        )
        # Several gRPC servers on one port and one event loop (SO_REUSEPORT): each accepts one
        # new call per turn of the loop, so with one a flood's calls queued in gRPC, unseen
        # by admission, ahead of everyone else's (see ACCEPT_LOOPS).
        self._servers = [
            self._grpc_server(settings, reuse_port=reuse_port or ACCEPT_LOOPS > 1)
            for _ in range(ACCEPT_LOOPS)
        ]
        self._gate = CallGate()
        self.admission = Admission(
            settings.max_unary_calls, beside_others=CALLS_BESIDE_OTHERS, presence_s=PRESENCE_S
        )
        # grpc-stubs predates grpc_health's asyncio servicer (health.aio, grpcio >= 1.37).
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._classifier = ClassifierServicer(
            max_message_bytes=settings.max_message_bytes,
            max_calls_per_connection=settings.max_streams_per_connection,
            gate=self._gate,
            admission=self.admission,
            recorder=self.wiring.recorder,
        )
        if stream_board is not None:
            self._classifier.board.join(*stream_board)
        self._oip = InferenceServicer(
            gate=self._gate, admission=self.admission, recorder=self.wiring.recorder
        )
        self._serving: ServingModel | None = None
        self._trimmer: MemoryTrimmer | None = None
        self._stopping: asyncio.Future[None] | None = None
        # Set when the backend breaks for the life of the process (a sticky CUDA error).
        self.broken = asyncio.Event()
        self.broken_reason: str | None = None
        self._health_tasks: set[asyncio.Future[None]] = set()
        for server in self._servers:
            self._classifier.add_to_server(server)
            self._oip.add_to_server(server)
            # Generated registrations go through guarded(): malformed requests get
            # INVALID_ARGUMENT. Health passes no gate: it must answer throughout a drain.
            health_pb2_grpc.add_HealthServicer_to_server(self._health, guarded(server))
            add_reflection(server, (pb.DESCRIPTOR, oip_pb.DESCRIPTOR, health_pb2.DESCRIPTOR))

    def _grpc_server(self, settings: ServerSettings, *, reuse_port: bool) -> grpc.aio.Server:
        interceptors = list(self.wiring.interceptors)
        if self._inference is not None:
            interceptors.append(InferenceAway(lambda: self._inference_away, _UNARY_INFERENCE))
        return grpc.aio.server(
            interceptors=interceptors,
            options=server_options(settings, reuse_port=reuse_port),
        )

    @property
    def gate(self) -> CallGate:
        """The gate every call of every servicer passes (for servicers added beside ours)."""
        return self._gate

    async def start(self) -> int:
        """Bind and start answering; returns the bound port (useful with port 0).

        Health says NOT_SERVING until load(), or SERVING at once when load() came first.
        """
        if self._serving is None:
            for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
                await self._health.set(service, NOT_SERVING)
        self.port = self.wiring.add_port(self._servers)
        if self.port == 0:
            raise OSError(f"could not bind {self.settings.address}")
        await self.wiring.start_metrics()
        await self.wiring.start_health_port(self._health, reuse_port=self._reuse_port)
        for server in self._servers:
            await server.start()
        self._classifier.board.start()
        logger.info(
            "listening on %s:%d, %s%s",
            self.settings.host,
            self.port,
            self.wiring.describe(),
            " (NOT_SERVING until the model is loaded)" if self._serving is None else "",
        )
        return self.port

    async def load(self) -> ServingModel:
        """Prepare the model, create the backend, warm it up, then report SERVING."""
        settings = self.settings
        started = time.monotonic()
        # Building a model or an engine takes seconds to minutes: keep the loop answering health.
        prepared = await asyncio.to_thread(
            prepare_model,
            settings.model,
            settings.cache_dir,
            allow_download=settings.allow_download,
        )
        batcher_settings = BatcherSettings(
            max_batch=settings.max_batch,
            max_delay_us=settings.max_delay_us,
            max_queue=settings.max_queue,
            memory_budget_bytes=settings.memory_budget_bytes,
        )
        batcher: BatcherLike
        backend: Backend
        if self._inference is not None:
            batcher, backend = await self._connect_inference(batcher_settings)
        elif self._backend_factory is not None:
            backend = await asyncio.to_thread(self._backend_factory, prepared.onnx_path)
        else:
            backend = await asyncio.to_thread(settings.create_backend, prepared.onnx_path)
        if isinstance(backend, BreakableBackend):
            loop = asyncio.get_running_loop()
            backend.on_broken(lambda reason: loop.call_soon_threadsafe(self._backend_broke, reason))
        if self._inference is None:
            batcher = Batcher(backend, batcher_settings, recorder=self.wiring.recorder)
            await batcher.start()
        try:
            # Warm up through the batcher, so the first batch runs on the thread all later ones
            # use (CUDA contexts and ORT's allocations are per thread).
            size = prepared.preset.input_size
            await batcher.submit(np.zeros((1, size, size, 3), dtype=np.uint8))
        except BaseException:
            await batcher.close()
            backend.close()
            raise
        self._serving = ServingModel(model=prepared, backend=backend, batcher=batcher)
        # Freed memory back to the OS once a burst is over (memory.py): only when nothing is
        # admitted or waiting, since a trim holds malloc's locks while it runs.
        admission = self.admission
        self._trimmer = MemoryTrimmer(
            lambda: batcher.admitted_bytes == 0 and admission.admitted + admission.waiting == 0
        )
        self._trimmer.start()
        if self.wiring.metrics is not None:
            self.wiring.metrics.serving(lambda: batcher.stats, prepared, backend.info)
        self._classifier.attach(self._serving)
        self._oip.attach(self._serving)
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            await self._health.set(service, SERVING)
        logger.info(
            "serving %s %s on %s (%s, %s) after %.1f s",
            prepared.name,
            prepared.version,
            backend.info.name,
            backend.info.device,
            backend.info.precision,
            time.monotonic() - started,
        )
        return self._serving

    async def _connect_inference(self, settings: BatcherSettings) -> tuple[BatcherLike, Backend]:
        """A front end: connect to the inference process, whose health becomes ours."""
        from .shared_inference import InferenceProxy

        assert self._inference is not None
        link, index = self._inference

        def on_state(up: bool) -> None:
            # The inference process went away (or came back): every front end says so.
            self._inference_away = not up
            if self._serving is None or self._stopping is not None:
                return
            state = SERVING if up else NOT_SERVING
            for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
                task = asyncio.ensure_future(self._health.set(service, state))
                self._health_tasks.add(task)
                task.add_done_callback(self._health_tasks.discard)

        proxy = InferenceProxy(link, index, settings, on_state=on_state)
        await proxy.start()
        assert proxy.backend is not None
        return proxy, proxy.backend

    def _backend_broke(self, reason: str) -> None:
        # Calls already fail with UNAVAILABLE (the service's error mapping); tell health
        # watchers at once, and serve() exits non-zero so the supervisor restarts the process.
        self.broken_reason = reason
        self.broken.set()
        for service in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            task = asyncio.ensure_future(self._health.set(service, NOT_SERVING))
            self._health_tasks.add(task)
            task.add_done_callback(self._health_tasks.discard)

    async def stop(
        self, grace: float | None = None, *, drain_delay: float | None = None, quiet: bool = False
    ) -> None:
        """Drain and stop: NOT_SERVING, the drain delay, then calls in flight finish.

        ``grace`` (default ``settings.grace_s``) bounds the time calls in flight get once new
        ones are refused; ``drain_delay`` (default ``settings.drain_delay_s``) is how long
        health says NOT_SERVING while calls are still served. ``quiet`` logs the steps at debug
        level only (the model failed to load: the reason is the one line the user needs).
        Idempotent: a second call waits for the first.
        """
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = asyncio.get_running_loop().create_future()
        try:
            await self._drain_and_stop(
                self.settings.grace_s if grace is None else grace,
                self.settings.drain_delay_s if drain_delay is None else drain_delay,
                logging.DEBUG if quiet else logging.INFO,
            )
        finally:
            self._stopping.set_result(None)

    async def _drain_and_stop(self, grace: float, drain_delay: float, level: int) -> None:
        await self._health.enter_graceful_shutdown()
        if drain_delay > 0:
            logger.log(level, "NOT_SERVING; draining in %.1f s", drain_delay)
            await asyncio.sleep(drain_delay)
        started = time.monotonic()
        self._gate.drain()
        if self._gate.active:
            logger.log(level, "draining %d call(s) (grace %.1f s)", self._gate.active, grace)
        # Calls go on being served until they stop arriving: a client that watches health
        # (the SDK over several replicas) leaves this replica within a round trip of
        # NOT_SERVING, and each of its calls refused meanwhile would spend a token of its retry
        # throttle (a few in a row failed calls). Clients that do not watch are refused next.
        await self._gate.wait_quiet(QUIET_S, min(grace, SERVE_CAP_S))
        self._gate.close()
        logger.log(level, "%s", REFUSING)
        left = max(0.0, grace - (time.monotonic() - started))
        if not await self._gate.wait_idle(left):
            logger.warning(
                "%d call(s) still running after the %.1f s grace period: cancelled",
                self._gate.active,
                grace,
            )
            await self._stop_servers(0)
        else:
            left = max(0.0, grace - (time.monotonic() - started))
            await self._gate.wait_quiet(QUIET_S, min(left, QUIET_CAP_S))
            # A call arriving from now on is never received (a slow client's next call):
            # benchmarks/overload_soak.py tells those from cut calls by this line.
            logger.log(level, "%s; closing the port", ALL_CALLS_ANSWERED)
            await self._stop_servers(min(grace, FINAL_STOP_GRACE_S))
        if self._trimmer is not None:
            await self._trimmer.stop()
        if self._serving is not None:
            await self._serving.batcher.close()
            self._serving.backend.close()
            self._serving = None
        await self._classifier.board.close()
        await self.wiring.stop_metrics()
        await self.wiring.stop_health_port()
        logger.log(level, "stopped")

    async def abort(self) -> None:
        """Stop at once: every call is cancelled (a second signal)."""
        await self._stop_servers(None)
        await self.wiring.stop_health_port()

    async def _stop_servers(self, grace: float | None) -> None:
        await asyncio.gather(*(server.stop(grace) for server in self._servers))


def _write_port_file(path: Path, port: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(path)  # readers never see a half-written file


def freeze_loaded() -> None:
    """Move what a serving process has loaded out of the garbage collector's way.

    What is loaded by then lives as long as the process, so a full collection (every few
    seconds under a flood of calls) walks only what calls made, not the model, gRPC and numpy
    (measured beside 200 calls over 100 connections, 2 cores: the longest collection 45 ->
    2.5 ms, each one a pause of the event loop). Called by the process's entry point once it
    serves, not in load(): a process that runs servers in turn (the tests) must not freeze its
    garbage.
    """
    gc.collect()
    gc.freeze()


async def serve(settings: ServerSettings, *, port_file: Path | None = None) -> int:
    """Run a server until SIGTERM or SIGINT; returns the process exit code.

    Raises ModelLoadError when the model cannot be loaded (the server stops first).

    port_file, when given, receives the bound port once the server listens (for --port 0).
    """
    server = FramecastServer(settings)
    stop = asyncio.Event()
    again = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (again if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    port = await server.start()
    if port_file is not None:
        await asyncio.to_thread(_write_port_file, port_file, port)
    load = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        stopping.cancel()
        await server.stop(0, quiet=True)
        # The command prints it as its last line (one sentence, no traceback).
        raise ModelLoadError(f"could not load the model: {load.exception()}") from load.exception()
    freeze_loaded()
    broken = asyncio.ensure_future(server.broken.wait())
    await asyncio.wait({stopping, broken}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.done():
        stopping.cancel()
        logger.critical("exiting so that the server is restarted: %s", server.broken_reason)
        await server.stop(0, drain_delay=0)
        return EXIT_BACKEND_BROKEN
    broken.cancel()
    logger.info(
        "signal received: draining (drain delay %.1f s, grace %.1f s; a second signal exits now)",
        settings.drain_delay_s,
        settings.grace_s,
    )
    if not load.done():
        load.cancel()
    stopped = asyncio.ensure_future(server.stop())
    second = asyncio.ensure_future(again.wait())
    await asyncio.wait({stopped, second}, return_when=asyncio.FIRST_COMPLETED)
    if stopped.done():
        second.cancel()
        stopped.result()
        return 0
    logger.warning("second signal: exiting now, calls in flight are cancelled")
    await server.abort()
    stopped.cancel()
    return 1
