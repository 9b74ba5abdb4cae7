"""Serve a TensorRT engine: one worker thread, two execution contexts on two CUDA streams.

CUDA contexts are per thread and TensorRT contexts are not thread-safe, so one worker thread
owns everything GPU-side (context, engine, pinned and device buffers, streams). Callers on any
thread hand it batches through a queue and wait on a future.

Two "slots" (execution context + stream + buffers sized for ``max_batch``) let the worker queue
batch B's host-to-device copy on one stream while batch A still computes on the other. That
overlap only exists when two batches are in flight at once, i.e. when callers use ``submit``
(or call ``infer`` from several threads); a single caller doing ``infer`` one batch at a time
gets plain sequential execution, which is still correct. ``infer_parts`` takes a batch as the
batcher has it, one array per request, and the worker copies each straight into the slot's
pinned input buffer: the batch's one host copy. Host memory registered with
``register_host_memory`` (the shared inference process's regions, page-locked in place with
``cudaHostRegister``) needs not even that: the parts that lie there are copied to the device
from where they are, one async copy per run of adjacent parts.

The worker runs on the device's primary context (see ``cuda.CudaContext``), the one TensorRT's
builder and runtime also use, so a process holds one CUDA context.

A sticky CUDA error (illegal address, launch failure: the context is poisoned) breaks the
backend for good: that batch, every queued one and every later call fail with
BackendBrokenError naming the error, and ``on_broken`` callbacks tell the server to stop serving
so that its supervisor restarts it. Any other error fails only its own batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
from numpy.typing import NDArray

from ..base import BackendBrokenError, BackendError, BackendInfo
from . import cuda
from .errors import (
    StickyCudaError,
    TensorRTBackendError,
    TensorRTCallError,
)
from .settings import CHANNELS, IMAGE_SIZE, EngineSettings
from .slot import Slot, check_engine_io, tensor_nbytes
from .trt_logging import process_logger

if TYPE_CHECKING:
    import tensorrt as trt

logger = logging.getLogger(__name__)

NUM_SLOTS = 2
__all__ = ["EngineDeserializeError", "TensorRTBackend", "check_engine_io", "tensor_nbytes"]


class EngineDeserializeError(TensorRTCallError):
    """TensorRT refused the plan (built by another TensorRT/driver, or damaged); rebuild it."""


@dataclass(slots=True)
class _Job:
    parts: Sequence[NDArray[np.uint8]]
    n: int  # images over all parts
    future: Future[NDArray[np.float32]]


@dataclass(slots=True)
class _Call:
    """Work for the worker thread between batches (host memory registration)."""

    run: Callable[[], None]
    future: Future[None]


class TensorRTBackend:
    """A Backend running a deserialized TensorRT plan on GPU ``device_index``.

    About 320 lines, kept whole on purpose: everything here runs on, or hands work to, the one
    worker thread that owns the CUDA context, and its invariants (which slot is free, what is
    in flight, when the backend is broken) are easier to check in one place; the per-batch GPU
    work is in slot.py.
    """

    def __init__(
        self,
        plan: bytes,
        settings: EngineSettings,
        *,
        device_name: str,
        device_index: int = 0,
    ) -> None:
        """Start the worker, which deserializes ``plan`` and allocates everything up front.

        Raises what the worker's setup raised (EngineDeserializeError, CudaError, ...).
        """
        self._settings = settings
        self._info = BackendInfo(name="tensorrt", precision=settings.precision, device=device_name)
        self._queue: queue.SimpleQueue[_Job | _Call | None] = queue.SimpleQueue()
        # Host memory registered with CUDA (the worker's alone, like everything GPU-side).
        self._registered: list[cuda.RegisteredHostMemory] = []
        self._closed = False
        self._broken: str | None = None
        self._on_broken: list[Callable[[str], object]] = []
        self._close_lock = threading.Lock()
        self._device_index = device_index
        self._slots: list[Slot] = []
        self._engine: trt.ICudaEngine | None = None
        self._runtime: trt.Runtime | None = None
        self._context: cuda.CudaContext | None = None
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(plan, ready), name="tensorrt-worker", daemon=True
        )
        self._thread.start()
        try:
            ready.result()
        except BaseException:
            self._thread.join()
            self._closed = True
            raise

    @property
    def info(self) -> BackendInfo:
        """name "tensorrt", precision "fp16", device = the GPU's name."""
        return self._info

    @property
    def max_batch(self) -> int:
        """Largest batch ``infer`` accepts (the engine profile's max)."""
        return self._settings.max_batch

    @property
    def max_concurrent_batches(self) -> int:
        """Two: one batch's copies overlap the other's compute, on two contexts and streams."""
        return NUM_SLOTS

    @property
    def broken(self) -> str | None:
        """Why the backend is broken for the life of the process, or None while it works."""
        return self._broken

    def on_broken(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(reason)`` once when a sticky CUDA error breaks the backend (on the
        worker thread), or at once if it already has."""
        with self._close_lock:
            if self._broken is None:
                self._on_broken.append(callback)
                return
            reason = self._broken
        callback(reason)

    def submit(self, images: NDArray[np.uint8]) -> Future[NDArray[np.float32]]:
        """Queue one batch and return at once; the future holds probabilities [N, 1000].

        Having two batches submitted lets the second's copy overlap the first's compute.
        Raises ValueError for a wrong shape or dtype, BackendError after ``close`` and
        BackendBrokenError once a sticky CUDA error broke the backend.
        """
        return self.submit_parts((images,))

    def submit_parts(self, parts: Sequence[NDArray[np.uint8]]) -> Future[NDArray[np.float32]]:
        """Like ``submit`` for the batch made of ``parts`` in order, which the worker gathers
        straight into its pinned input buffer (no joined copy of the batch is made)."""
        n = self._validate(parts)
        future: Future[NDArray[np.float32]] = Future()
        with self._close_lock:
            if self._broken is not None:
                raise BackendBrokenError(self._broken)
            if self._closed:
                raise BackendError("TensorRT backend is closed")
            self._queue.put(_Job(tuple(parts), n, future))
        return future

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Classify one batch (1 <= N <= max_batch) and wait for the result.

        Raises ValueError on a wrong shape or dtype and a TensorRTBackendError subclass
        (CudaError, TensorRTCallError) naming the call that failed.
        """
        return self.submit(images).result()

    def infer_parts(self, parts: Sequence[NDArray[np.uint8]]) -> NDArray[np.float32]:
        """Classify the images of ``parts`` as one batch (the batcher's requests, unjoined)."""
        return self.submit_parts(parts).result()

    def register_host_memory(self, buffer: NDArray[np.uint8]) -> None:
        """Page-lock ``buffer`` where it lies (``cudaHostRegister``, portable): batch parts
        inside it are then copied to the device from there (see the module doc)."""
        self._on_worker(lambda: self._registered.append(cuda.RegisteredHostMemory(buffer)))

    def unregister_host_memory(self, buffer: NDArray[np.uint8]) -> None:
        """Unpin ``buffer`` (registered earlier), once the batches queued before are done."""
        start = int(buffer.__array_interface__["data"][0])

        def unregister() -> None:
            for region in [r for r in self._registered if r.start == start]:
                region.unregister()
                self._registered.remove(region)

        self._on_worker(unregister)

    def _on_worker(self, run: Callable[[], None]) -> None:
        """Run ``run`` on the worker thread, after every batch queued before; wait for it."""
        future: Future[None] = Future()
        with self._close_lock:
            if self._broken is not None:
                raise BackendBrokenError(self._broken)
            if self._closed:
                raise BackendError("TensorRT backend is closed")
            self._queue.put(_Call(run, future))
        future.result()

    def close(self) -> None:
        """Finish queued batches, then free contexts, engine, buffers, streams and the CUDA
        context on the worker thread; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _validate(self, parts: Sequence[NDArray[np.uint8]]) -> int:
        """Check every part's dtype and shape and the batch size; return the batch size."""
        n = 0
        for images in parts:
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
                got = getattr(images, "dtype", type(images))
                raise ValueError(f"images must be a uint8 ndarray, got {got}")
            if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, CHANNELS):
                raise ValueError(f"images must be [N, 224, 224, 3], got {list(images.shape)}")
            n += images.shape[0]
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch of {n} outside 1..{self.max_batch}")
        return n

    # --- worker thread -------------------------------------------------------------------

    def _setup(self, plan: bytes) -> None:
        import tensorrt as trt

        self._context = cuda.CudaContext(self._device_index)
        self._runtime = trt.Runtime(process_logger())
        engine = cast("trt.ICudaEngine | None", self._runtime.deserialize_cuda_engine(plan))
        if engine is None:
            raise EngineDeserializeError(
                "Runtime.deserialize_cuda_engine",
                "returned None (plan from another TensorRT version or GPU, or damaged)",
            )
        self._engine = engine
        layout = check_engine_io(engine, self.max_batch)
        for _ in range(NUM_SLOTS):
            self._slots.append(Slot(engine, layout))
        logger.info(
            "TensorRT engine ready on %s: max batch %d, %d slots, %.1f MB pinned I/O per slot",
            self._info.device,
            self.max_batch,
            NUM_SLOTS,
            (layout.input_bytes + layout.output_bytes) / 1e6,
        )

    def _teardown(self) -> None:
        # Order matters: contexts before the engine, the engine before the runtime, and all
        # of it while the CUDA context is still current on this thread.
        for region in self._registered:
            try:
                region.unregister()
            except TensorRTBackendError:
                logger.exception("unregistering host memory failed")
        self._registered.clear()
        for slot in self._slots:
            try:
                slot.free()
            except TensorRTBackendError:
                logger.exception("freeing TensorRT slot failed")
        self._slots.clear()
        self._engine = None
        self._runtime = None
        if self._context is not None:
            try:
                self._context.close()
            except TensorRTBackendError:
                logger.exception("releasing the CUDA context failed")
            self._context = None

    def _run(self, plan: bytes, ready: Future[None]) -> None:
        try:
            self._setup(plan)
        except BaseException as exc:
            self._teardown()
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            self._serve()
        finally:
            self._teardown()

    def _serve(self) -> None:
        free: deque[Slot] = deque(self._slots)
        in_flight: deque[tuple[Slot, _Job]] = deque()
        stopping = False
        while True:
            # Start as many batches as there are free slots, blocking only when idle.
            while free and not stopping:
                try:
                    job = self._queue.get(block=not in_flight)
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if isinstance(job, _Call):
                    # Between batches: what was queued before it finishes first (an
                    # unregistered region must be read by no copy still queued).
                    while in_flight:
                        if not self._collect(in_flight, free):
                            return
                    try:
                        job.run()
                    except BaseException as exc:
                        job.future.set_exception(exc)
                    else:
                        job.future.set_result(None)
                    continue
                slot = free.popleft()
                try:
                    slot.enqueue(job.parts, job.n, self._registered)
                except StickyCudaError as exc:
                    self._break(exc, [job, *(j for _, j in in_flight)])
                    return
                except BaseException as exc:
                    self._fail(job, exc)
                    # Drain whatever part of the batch was queued before the slot is reused.
                    try:
                        slot.collect(0)
                    except StickyCudaError as sticky:
                        self._break(sticky, [j for _, j in in_flight])
                        return
                    except TensorRTBackendError:
                        logger.exception("stream sync after failed enqueue")
                    free.append(slot)
                else:
                    in_flight.append((slot, job))
            if not in_flight:
                if stopping:
                    return
                continue
            if not self._collect(in_flight, free):
                return

    def _collect(self, in_flight: deque[tuple[Slot, _Job]], free: deque[Slot]) -> bool:
        """Wait for the oldest batch in flight and answer it; False once the backend broke."""
        slot, job = in_flight.popleft()
        try:
            job.future.set_result(slot.collect(job.n))
        except StickyCudaError as exc:
            self._break(exc, [job, *(j for _, j in in_flight)])
            return False
        except BaseException as exc:
            self._fail(job, exc)
        free.append(slot)
        return True

    def _break(self, exc: StickyCudaError, jobs: list[_Job]) -> None:
        """Mark the backend broken, fail ``jobs`` and everything queued, tell the callbacks."""
        reason = (
            f"the GPU context is lost ({exc}); this process can run no more batches and must "
            "be restarted"
        )
        logger.critical("TensorRT backend broken: %s", reason)
        with self._close_lock:
            self._broken = reason
            callbacks, self._on_broken = self._on_broken, []
        while True:  # nothing new arrives: submit refuses once _broken is set
            try:
                queued = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(queued, _Call):
                queued.future.set_exception(BackendBrokenError(reason))
            elif queued is not None:
                jobs.append(queued)
        for job in jobs:
            error = BackendBrokenError(reason)
            error.__cause__ = exc
            job.future.set_exception(error)
        for callback in callbacks:
            try:
                callback(reason)
            except Exception:
                logger.exception("on_broken callback failed")

    @staticmethod
    def _fail(job: _Job, exc: BaseException) -> None:
        if isinstance(exc, BackendError):
            job.future.set_exception(exc)
        else:
            wrapped = BackendError(f"TensorRT batch failed: {exc!r}")
            wrapped.__cause__ = exc
            job.future.set_exception(wrapped)
