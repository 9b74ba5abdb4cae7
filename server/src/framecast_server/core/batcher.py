"""Dynamic batching: the server core between the gRPC servicers and the backend.

Every image of every request and stream goes through one :class:`Batcher`. Callers ``await
submit(images)`` on the event loop; the batcher gathers queued requests into batches of at
most ``max_batch`` images and hands each batch to a dedicated worker thread, which makes ONE
``backend.infer`` call per batch. The event loop never runs inference.

Policies:

* **Batch formation.** A batch is dispatched when the queue holds at least ``max_batch`` images, or
  when ``max_delay_us`` has passed since the oldest queued request was admitted, whichever comes
  first, and a worker is free. The delay is counted from admission, not from when the worker
  became free: items that already waited while the previous batch computed go at once.
* **Requests are never split.** A request (1 <= n <= max_batch images) always rides in one batch.
  When the next request does not fit in the room left, the batch closes and that request opens
  the next one; the cost is a batch at most ``n - 1`` images short of full. Requests whose images
  differ in height or width also close the batch, since they cannot share one input array.
* **Fair order between callers.** Every request names its caller (an opaque hashable key: a
  connection today, a client identity once there is authentication). The queue is served in
  start-time fair queueing order, counted in images: a caller's request starts at the later of
  the batcher's virtual time and the end of that caller's previous request, so a caller with a
  thousand requests queued cannot push a caller with one behind them all; each caller's own
  requests stay first in, first out (streams rely on that), and with one caller, or callers that
  each have little queued, the order is plain arrival order.
* **Pipelining.** The queue keeps filling and the delay clock keeps running while a batch
  computes; the next batch is taken from the queue the moment a worker posts its result back
  (no task in between: admission, completion and the delay timer each call the dispatch step
  directly), so the backend is not idle while work is due. A backend runs
  ``max_concurrent_batches`` batches at once, each handed to its own worker thread: 1 for
  ONNX Runtime (infer only ever sees one thread), 2 for TensorRT (one batch's copies overlap
  the other's compute). Items can be dropped (deadline, cancellation) until they run.
* **Copies.** At most one copy of the images per batch, and one of the output
  (``batching/workers.py``).
* **Dropping.** An item whose deadline passes while queued is removed at once (a timer) and its
  caller gets :class:`DeadlineExpiredError`; deadlines are checked again when the batch is taken.
  A caller whose awaiting task is cancelled (gRPC does that when a client cancels or disconnects)
  has its request removed from the queue at once. Neither ever reaches the backend. Once a batch
  is running it runs to completion; results of callers that went away are discarded.
* **Failures.** An exception from the backend fails only the requests of that batch: each gets a
  :class:`BackendError` whose ``__cause__`` is the original exception. The batcher keeps running.
* **Bounds.** At most ``max_queue`` images wait in the queue, and the images admitted (waiting or
  computing) hold at most ``memory_budget_bytes``. A request that does not fit is refused whole
  with :class:`QueueFullError`; :meth:`Batcher.wait_for_room` lets a stream wait instead (flow
  control). The last quarter of both limits is kept for callers with modest demand (at most
  ``max_batch`` images admitted, this request included), so a greedy caller cannot lock the
  others out. A finished or dropped request lets go of its images at once.
* **No reference cycles.** Failed work must not keep frames alive until a full garbage
  collection: exceptions handed to callers carry no traceback (the worker logs it), and the
  worker thread holds no batch while it waits for the next one.

This module puts the parts together; each lives in ``batching/``: the queueing policy
(``fair_queue.py``: bounds, reserves, fair order, dropping), the timers and threads
(``workers.py``), the statistics (``stats.py``), and what callers configure and get back
(``settings.py``, re-exported here).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from numpy.typing import NDArray

from ..backends.base import Backend, BackendError
from .batching.fair_queue import FairQueue
from .batching.settings import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    BatcherClosedError,
    BatcherSettings,
    Caller,
    DeadlineExpiredError,
    ItemResult,
    QueueFullError,
)
from .batching.stats import BatcherStats, Counters
from .batching.workers import Batch, DelayTimer, InferenceThreads, Outcome
from .recorder import NULL_RECORDER, Recorder

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "Batcher",
    "BatcherClosedError",
    "BatcherSettings",
    "BatcherStats",
    "Caller",
    "DeadlineExpiredError",
    "ItemResult",
    "QueueFullError",
]


class Batcher:
    """Gathers images from all callers into batches and runs them on the worker threads.

    Use from one event loop: ``await start()``, then any number of concurrent ``submit`` calls,
    then ``await close()``. The batcher does not own the backend: closing it is the caller's job,
    after ``close()`` returns. See the module docstring for the batching policies.
    """

    def __init__(
        self, backend: Backend, settings: BatcherSettings, recorder: Recorder = NULL_RECORDER
    ) -> None:
        """``recorder`` is told of every batch run (metrics); counters are in ``stats``."""
        if settings.max_batch > backend.max_batch:
            raise ValueError(
                f"max_batch {settings.max_batch} exceeds the backend's max_batch "
                f"{backend.max_batch}"
            )
        self._settings = settings
        self._recorder = recorder
        self._delay_ns = settings.max_delay_us * 1000
        self._counters = Counters()
        self._queue = FairQueue(settings, self._counters)
        self._threads = InferenceThreads(backend)
        self._depth = self._threads.depth
        self._timer = DelayTimer(self._maybe_dispatch)  # fires when the oldest request is due
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: set[Batch] = set()  # batches handed to the threads
        self._dispatch_soon = False  # a _dispatch_soon_now callback is scheduled
        self._drained: asyncio.Event | None = None

    @property
    def settings(self) -> BatcherSettings:
        """The settings the batcher was built with."""
        return self._settings

    @property
    def queued(self) -> int:
        """Images waiting in the queue now (not counting the batch computing)."""
        return self._queue.queued

    @property
    def admitted_bytes(self) -> int:
        """Bytes of images admitted now, waiting or computing (what the memory budget bounds)."""
        return self._queue.admitted_bytes

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (or the dispatcher stopped): no work is admitted."""
        return self._closing

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        q = self._queue
        return self._counters.snapshot(
            queued=q.queued, admitted_bytes=q.admitted_bytes, callers=q.callers
        )

    @property
    def model_stats(self) -> BatcherStats:
        """The model's statistics (the Open Inference Protocol's): here, ``stats``."""
        return self.stats

    @property
    def counters(self) -> Counters:
        """The live counters (read-only to callers: what the inference process publishes)."""
        return self._counters

    async def start(self) -> None:
        """Start the worker threads; the batcher then serves callers on the running loop."""
        if self._closing:
            raise BatcherClosedError("the batcher is closed")
        if self._threads.started:
            raise RuntimeError("the batcher is already started")
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._threads.start(self._loop, self._on_batch_done)

    async def submit(
        self,
        images: NDArray[np.uint8],
        *,
        deadline: float | None = None,
        caller: Caller = None,
    ) -> list[ItemResult]:
        """Classify ``images`` (uint8 [n, H, W, 3], 1 <= n <= max_batch); results in order.

        ``deadline`` is a ``time.monotonic()`` value: if it passes before the images run they are
        dropped and :class:`DeadlineExpiredError` is raised. ``caller`` says whose work it is,
        for the fair order and the reserves (see the module docstring). All n images are
        admitted or none: :class:`QueueFullError` at once when the queue or the memory budget
        lacks room, :class:`BatcherClosedError` once closing. A failed batch raises
        :class:`BackendError`. Bad input raises ValueError. Cancelling the awaiting task
        withdraws the request if it has not started computing.
        """
        # Cancelling the awaiting task cancels the awaited future, which withdraws the request.
        return await self.submit_nowait(images, deadline=deadline, caller=caller)

    def submit_nowait(
        self,
        images: NDArray[np.uint8],
        *,
        deadline: float | None = None,
        caller: Caller = None,
    ) -> asyncio.Future[list[ItemResult]]:
        """Admit ``images`` now and return the future of their results (as ``submit``).

        For callers with many items in flight (a stream): no coroutine or task per item.
        Admission errors are raised here; cancelling the future withdraws a queued request.
        """
        n = self._validate(images)
        if self._closing:
            raise BatcherClosedError("the batcher is closed")
        loop = self._loop
        if loop is None:
            raise RuntimeError("the batcher is not started")
        if asyncio.get_running_loop() is not loop:
            raise RuntimeError("submit() must run on the event loop the batcher was started on")
        req = self._queue.admit(images, n, deadline, caller, loop)
        if self._queue.queued >= self._settings.max_batch:
            self._maybe_dispatch()
        elif not self._dispatch_soon:
            # Dispatch at the end of this event-loop iteration, not now: requests that arrive
            # in the same iteration (gRPC delivers several messages per wake-up) then share
            # one batch and one thread hand-off, for the cost of one callback.
            self._dispatch_soon = True
            loop.call_soon(self._dispatch_soon_now)
        return req

    def has_room(self, images: NDArray[np.uint8], *, caller: Caller = None) -> bool:
        """Whether ``submit`` would admit ``images`` for ``caller`` now (limits only)."""
        return self._queue.has_room(images, caller)

    async def wait_for_room(self, images: NDArray[np.uint8], *, caller: Caller = None) -> None:
        """Wait until ``images`` fit the queue and the memory budget for ``caller``.

        What a stream does instead of failing its frames when the server is full: it stops
        reading, and HTTP/2 flow control pushes back on the client. Raises
        :class:`BatcherClosedError` once closing.
        """
        loop = asyncio.get_running_loop()
        while not self._closing and not self._queue.has_room(images, caller):
            waiter = self._queue.room_waiter(loop)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
        if self._closing:
            raise BatcherClosedError("the batcher is closed")

    async def close(self) -> None:
        """Stop admitting work, run everything already queued, then stop the worker threads.

        New ``submit`` calls fail with :class:`BatcherClosedError` from the moment this is
        called. Queued requests are dispatched without waiting for ``max_delay``. Idempotent.
        """
        self._closing = True
        self._queue.wake_room_waiters()
        if self._loop is None or self._drained is None:
            return  # never started
        self._maybe_dispatch()
        # Shielded so that a cancelled close() still lets the queued work drain.
        await asyncio.shield(self._drained.wait())
        # The last batch has been delivered, so the threads are idle: this only joins.
        await self._threads.stop()

    @staticmethod
    def _validate_shape(images: NDArray[np.uint8]) -> None:
        if not isinstance(images, np.ndarray):
            raise ValueError(f"images must be a numpy array, not {type(images).__name__}")
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, not {images.dtype}")
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"images must be [n, H, W, 3], not {list(images.shape)}")

    def _validate(self, images: NDArray[np.uint8]) -> int:
        self._validate_shape(images)
        n = int(images.shape[0])
        if not 1 <= n <= self._settings.max_batch:
            raise ValueError(f"a request holds 1 to {self._settings.max_batch} images, not {n}")
        if images.shape[1] < 1 or images.shape[2] < 1:
            raise ValueError(f"images must not be empty, got {list(images.shape)}")
        return n

    def _maybe_dispatch(self) -> None:
        """Hand due batches to free threads; else make sure the timer will ask again.

        Called on the event loop whenever something changes: a request admitted, a batch done,
        the delay timer fired, close(). No task sits in between, so an idle batcher costs a
        request no event-loop hop on its way to the worker.
        """
        q = self._queue
        while len(self._running) < self._depth and q.queued:
            if self._delay_ns and not self._closing and q.queued < self._settings.max_batch:
                due_ns = q.oldest_enqueued_ns() + self._delay_ns
                if due_ns > time.monotonic_ns():
                    assert self._loop is not None
                    self._timer.arm(self._loop, due_ns)
                    return
            requests, arrays = q.take()
            if requests:  # else every candidate was dropped: look again
                running = Batch(requests, arrays)
                self._running.add(running)
                self._threads.put(running)
        if self._closing and not self._running and not q.queued and self._drained:
            self._drained.set()

    def _dispatch_soon_now(self) -> None:
        self._dispatch_soon = False
        self._maybe_dispatch()

    def _on_batch_done(self, batch: Batch, outcome: Outcome) -> None:
        try:
            if isinstance(outcome, BaseException):
                self._fail_batch(batch, outcome)
            else:
                self._deliver(batch, *outcome)
        finally:
            self._running.discard(batch)
            self._maybe_dispatch()

    def _fail_batch(self, batch: Batch, exc: BaseException) -> None:
        size = batch.size
        self._counters.failed_batches += 1
        self._counters.failed_images += size
        for req in batch.requests:
            self._queue.finish(req)
            if not req.done():
                # One exception object per caller: a shared one would collect every caller's
                # traceback as each re-raises it.
                error = BackendError(f"inference failed for a batch of {size} images: {exc}")
                error.__cause__ = exc
                req.set_exception(error)

    def _deliver(self, batch: Batch, probabilities: NDArray[np.float32], compute_ns: int) -> None:
        size = batch.size
        counters = self._counters
        counters.batches_run += 1
        counters.images_run += size
        counters.compute_ns += compute_ns * size
        counters.last_run_unix_ns = time.time_ns()
        finish = self._queue.finish
        compute_us = compute_ns // 1000
        offset = 0
        waits: list[int] = []
        for req in batch.requests:
            finish(req)
            queue_ns = batch.dispatched_ns - req.enqueued_ns
            waits += [queue_ns] * req.n
            counters.queue_ns += queue_ns * req.n
            if not req.done():  # a caller cancelled mid-compute gets nothing
                queue_us = queue_ns // 1000
                req.set_result(
                    [
                        ItemResult(probabilities[offset + i], queue_us, compute_us, size)
                        for i in range(req.n)
                    ]
                )
            offset += req.n
        self._recorder.batch_done(size, compute_ns, waits)
