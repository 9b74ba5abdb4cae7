"""`framecast serve --workers N`: N server processes on one port, and the supervisor of them.

One Python process spends 150 to 500 us of CPU per frame in gRPC and protobuf, on one core
(the GIL), so it moves a few thousand frames a second whatever the backend can do. Workers
multiply that: each is a complete server (gRPC, batcher, its own backend) in its own process,
listening on the same port with SO_REUSEPORT, and the kernel spreads incoming connections over
them. A connection stays with its worker, so a camera's stream is served in order by one.

Two designs (``--inference``): each worker with its own backend (per-worker), or the workers
as front ends that hand their frames through shared memory to one inference process that owns
the backend and batches across all of them (shared; shared_inference/). Per-worker is what
scales on the CPU (each worker's ONNX Runtime gets its share of the cores) and adds no hop;
shared is what feeds a GPU, whose throughput needs batches in the tens to hundreds that N
workers' own queues do not form, and whose CUDA contexts time-slice the device without MPS.
``auto`` takes shared on TensorRT, per-worker on the CPU; docs/scaling.md has the figures.
The inference process sits in the supervisor's slot after the workers': it starts first,
is restarted like a worker when it dies (the front ends say NOT_SERVING meanwhile), and is
stopped last, after the front ends have drained.

The supervisor (this process) reserves the port, starts the workers, restarts a worker that
dies (logged, with backoff, giving up when restarts keep failing), and on SIGTERM or SIGINT
tells every worker to drain and waits for them. A worker loads its model before it listens, so
a connection never lands on a worker that cannot answer yet: health has one answer for the
host, SERVING from every worker that listens, until the drain turns them all NOT_SERVING.
Models and engines are prepared under the cache's file locks (model/prepare.py,
backends/tensorrt/cache.py): the first worker builds, the others wait and load the result.

Metrics across workers (``--metrics-port``; prometheus_client's multiprocess mode, see
metrics/multiprocess.py): the supervisor makes a fresh directory, gives it to every worker in
``PROMETHEUS_MULTIPROC_DIR``, serves the one /metrics endpoint that sums their files, marks a
worker's files dead when it ends (its live gauges go, its counts stay), and removes the
directory when it stops.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..settings import FRAME_BYTES, ServerSettings
from .cores import worker_settings
from .worker_main import BackendFactory, inference_main, worker_main

if TYPE_CHECKING:
    from ..metrics.multiprocess import SupervisorMetrics
    from .shared_inference import InferenceLink

InferenceMode = Literal["per-worker", "shared", "auto"]
INFERENCE_MODES: tuple[InferenceMode, ...] = ("per-worker", "shared", "auto")

logger = logging.getLogger(__name__)

# A worker that ends before it has served this long counts as failing to start.
_QUICK_EXIT_S = 10.0
# Workers failing to start in a row before the supervisor gives up (a broken model, a GPU gone).
_MAX_QUICK_EXITS = 5
_RESTART_BACKOFF_S = (0.5, 30.0)  # first and longest wait before restarting a worker
# How long past the drain grace a worker may take before it is killed.
_STOP_MARGIN_S = 5.0


class PortUnavailableError(OSError):
    """The port cannot be had (another program holds it, or the address is not this host's)."""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) ``host:port`` with SO_REUSEPORT: it picks the port for port 0, fails
    at once when another program holds the port, and keeps the port for restarted workers."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    reserved = socket.socket(family, kind, proto)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(address)
    except OSError:
        reserved.close()
        raise
    return reserved


def resolve_inference(mode: InferenceMode, settings: ServerSettings) -> InferenceMode:
    """``auto``: the shared inference process on TensorRT (one GPU fed from every front end),
    per-worker backends on the CPU, where each worker's ONNX Runtime uses its share of the
    cores and the hand-off would only add a hop (docs/scaling.md has the figures)."""
    if mode != "auto":
        return mode
    if settings.backend == "tensorrt":
        return "shared"
    if settings.backend == "auto":
        from ..backends.tensorrt.availability import tensorrt_unavailable_reason

        return "shared" if tensorrt_unavailable_reason() is None else "per-worker"
    return "per-worker"


@dataclasses.dataclass(slots=True)
class _Worker:
    index: int
    process: Any  # multiprocessing's SpawnProcess
    report: Connection
    started: float
    serving: bool = False


class Supervisor:
    """Runs ``workers`` server processes on one port until SIGTERM or SIGINT (see module doc)."""

    def __init__(
        self,
        settings: ServerSettings,
        workers: int,
        *,
        port_file: Path | None = None,
        on_worker_exit: Callable[[int], None] | None = None,
        inference: InferenceMode = "per-worker",
        backend_factory: BackendFactory | None = None,
    ) -> None:
        """``inference``: per-worker backends, or one shared inference process (``auto``
        picks by backend, see :func:`resolve_inference`). ``backend_factory`` (picklable)
        replaces ``settings.backend`` in whichever process runs the backend."""
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.settings = settings
        self.workers = workers
        self.inference = resolve_inference(inference, settings)
        self._factory = backend_factory
        self._link: InferenceLink | None = None
        # The inference process sits in the slot after the workers'.
        self._port_file = port_file
        self._on_worker_exit = on_worker_exit
        self._metrics: SupervisorMetrics | None = None
        self._context = multiprocessing.get_context("spawn")
        self._slots: list[_Worker | None] = [None] * (workers + (self.inference == "shared"))
        self._restart_at: dict[int, float] = {}
        self._quick_exits = 0
        self._announced = False
        self._board: Path | None = None  # the workers' stream listings (stream_board.py)

    def run(self) -> int:
        """Serve until a signal (exit 0) or until workers cannot start (exit 1)."""
        try:
            reserved = reserve_port(self.settings.host, self.settings.port)
        except OSError as exc:
            raise PortUnavailableError(
                f"cannot listen on {self.settings.address}: {exc.strerror or exc}"
            ) from exc
        port = int(reserved.getsockname()[1])
        health: socket.socket | None = None
        try:
            if self.settings.health_port is not None:
                # The health-only port is shared by the workers too (each answers for itself).
                try:
                    health = reserve_port(self.settings.host, self.settings.health_port)
                except OSError as exc:
                    raise PortUnavailableError(
                        f"cannot listen on the health port {self.settings.health_port}: "
                        f"{exc.strerror or exc}"
                    ) from exc
            health_port = int(health.getsockname()[1]) if health is not None else None
            settings = worker_settings(self.settings, self.workers, port, health_port)
            metrics = self._start_metrics()  # before any worker: they need its directory
        except BaseException:
            reserved.close()
            if health is not None:
                health.close()
            raise
        wake_read, wake_write = socket.socketpair()
        wake_write.setblocking(False)
        signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        received: list[int] = []
        previous = {
            sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        logger.info(
            "starting %d workers on %s:%d (%s ONNX Runtime threads each)",
            self.workers,
            settings.host,
            port,
            settings.threads,
        )
        link_dir = None
        board: tempfile.TemporaryDirectory[str] | None = None
        try:
            board = tempfile.TemporaryDirectory(prefix="framecast-streams-")
            self._board = Path(board.name)
            if self.inference == "shared":
                from .shared_inference import create_link

                link_dir = tempfile.TemporaryDirectory(prefix="framecast-inference-")
                # The budget is the inference process's to keep; a region also holds the frames
                # its front end sent on a published count that lagged (the inference process
                # holds them until there is room): without a batch of slack, one such stream
                # frame took the unit a modest caller's admitted frame needed.
                region_bytes = settings.memory_budget_bytes + settings.max_batch * FRAME_BYTES
                self._link = create_link(
                    Path(link_dir.name), self.workers, region_bytes, FRAME_BYTES
                )
                logger.info("one shared inference process for the %d workers", self.workers)
            for index in range(len(self._slots)):
                self._start(index, settings)
            code = self._watch(settings, port, wake_read, received)
            self._stop_all()
            return code
        finally:
            for worker in self._slots:
                if worker is not None and worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
            signal.set_wakeup_fd(-1)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_read.close()
            wake_write.close()
            reserved.close()
            if health is not None:
                health.close()
            if self._link is not None:
                from .shared_inference import unlink_link

                unlink_link(self._link)
                self._link = None
            if link_dir is not None:
                link_dir.cleanup()
            if board is not None:
                board.cleanup()
            if metrics is not None:
                metrics.close()
                self._metrics = None

    def _start_metrics(self) -> SupervisorMetrics | None:
        """With ``--metrics-port``: the workers' shared directory and the one /metrics."""
        if self.settings.metrics_port is None:
            return None
        # Imported only here: without metrics the supervisor never loads prometheus_client.
        from ..metrics.multiprocess import SupervisorMetrics

        metrics = SupervisorMetrics(self.settings.host, self.settings.metrics_port)
        try:
            metrics.start(self._live_workers)
        except OSError as exc:
            metrics.close()
            raise PortUnavailableError(
                f"cannot serve metrics on port {self.settings.metrics_port}: {exc.strerror or exc}"
            ) from exc
        self._metrics = metrics
        return metrics

    def _live_workers(self) -> dict[str, int]:
        """The pids of the workers now running, by label (for process metrics); any thread."""
        live = {}
        for worker in list(self._slots):
            if worker is not None and worker.process.pid is not None:
                label = "inference" if self._is_inference(worker.index) else "worker"
                live[f"{label}-{worker.index}"] = int(worker.process.pid)
        return live

    def _ended(self, pid: int) -> None:
        if self._metrics is not None:
            self._metrics.worker_ended(pid)
        if self._on_worker_exit is not None:
            self._on_worker_exit(pid)

    def _is_inference(self, index: int) -> bool:
        return index == self.workers

    def _name(self, index: int) -> str:
        return "the inference process" if self._is_inference(index) else f"worker {index}"

    def _start(self, index: int, settings: ServerSettings) -> None:
        receive, send = self._context.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel()
        if self._is_inference(index):
            process = self._context.Process(
                target=inference_main,
                args=(settings, self._link, self._factory, send, level),
                name="framecast-inference",
            )
        else:
            process = self._context.Process(
                target=worker_main,
                args=(settings, index, send, level, self._link, self._factory, self._board),
                name=f"framecast-worker-{index}",
            )
        process.start()
        send.close()  # the worker holds the other end; EOF here when it dies
        self._slots[index] = _Worker(index, process, receive, time.monotonic())
        logger.info("%s started (pid %d)", self._name(index), process.pid)

    def _watch(
        self, settings: ServerSettings, port: int, wake: socket.socket, received: list[int]
    ) -> int:
        while not received:
            workers = [w for w in self._slots if w is not None]
            waitables: list[Any] = [wake, *(w.process.sentinel for w in workers)]
            waitables += [w.report for w in workers if not w.serving]
            timeout = None
            if self._restart_at:
                timeout = max(0.0, min(self._restart_at.values()) - time.monotonic())
            ready = wait(waitables, timeout)
            if wake in ready:
                wake.recv(64)
            for worker in workers:
                if worker.report in ready and not worker.serving:
                    self._note_serving(worker, port)
                if worker.process.sentinel in ready:
                    code = self._note_exit(worker)
                    if code is not None:
                        return code
            now = time.monotonic()
            for index, when in list(self._restart_at.items()):
                if when <= now and not received:
                    del self._restart_at[index]
                    self._start(index, settings)
        logger.info(
            "%s received: draining %d workers",
            signal.Signals(received[0]).name,
            sum(1 for w in self._slots if w is not None),
        )
        return 0

    def _note_serving(self, worker: _Worker, port: int) -> None:
        try:
            worker.report.recv()
        except EOFError:
            return  # it died before it served; its exit is handled below
        worker.serving = True
        self._quick_exits = 0
        logger.info("worker %d serving (pid %d)", worker.index, worker.process.pid)
        if not self._announced and all(w is not None and w.serving for w in self._slots):
            self._announced = True
            logger.info("all %d workers serving on %s:%d", self.workers, self.settings.host, port)
            if self._port_file is not None:
                temporary = self._port_file.with_name(self._port_file.name + ".tmp")
                temporary.write_text(f"{port}\n")
                temporary.replace(self._port_file)

    def _note_exit(self, worker: _Worker) -> int | None:
        """A worker ended on its own: schedule its restart, or return the supervisor's exit."""
        process = worker.process
        process.join()
        worker.report.close()
        self._slots[worker.index] = None
        self._ended(process.pid)
        code = process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        if not self._announced and not worker.serving:
            # The host has not served yet: a worker that cannot load will not load on retry
            # either (a bad model file, a missing GPU); say so instead of looping.
            logger.error(
                "worker %d (pid %d) %s before serving; stopping", worker.index, process.pid, how
            )
            self._stop_all()
            return 1
        quick = not worker.serving or time.monotonic() - worker.started < _QUICK_EXIT_S
        self._quick_exits = self._quick_exits + 1 if quick else 0
        if self._quick_exits >= _MAX_QUICK_EXITS:
            logger.error(
                "worker %d (pid %d) %s; %d restarts in a row failed, stopping",
                worker.index,
                process.pid,
                how,
                self._quick_exits,
            )
            self._stop_all()
            return 1
        first, longest = _RESTART_BACKOFF_S
        delay = min(longest, first * 2 ** max(0, self._quick_exits - 1)) if quick else 0.0
        logger.error(
            "worker %d (pid %d) %s; restarting it in %.1f s", worker.index, process.pid, how, delay
        )
        self._restart_at[worker.index] = time.monotonic() + delay
        return None

    def _stop_all(self) -> None:
        """SIGTERM to every worker (each drains), then wait; kill any that outlive the grace."""
        self._restart_at.clear()
        everyone = [w for w in self._slots if w is not None]
        front = [w for w in everyone if not self._is_inference(w.index)]
        # Front ends drain first (what they admitted is answered by the inference process),
        # then the inference process.
        self._stop_group(front)
        self._stop_group([w for w in everyone if self._is_inference(w.index)])
        if everyone:
            logger.info("all workers stopped")

    def _stop_group(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)
        # A worker's drain: NOT_SERVING for the drain delay, then calls get the grace period.
        drain_s = self.settings.drain_delay_s + self.settings.grace_s
        deadline = time.monotonic() + drain_s + _STOP_MARGIN_S
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                logger.error("worker %d did not drain in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join()
            worker.report.close()
            self._slots[worker.index] = None
            self._ended(worker.process.pid)
