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
* **Copies.** A batch of one request passes the caller's array to the backend as is (no copy if it
  is C-contiguous). A batch of several requests is concatenated once into a fresh array, on the
  worker thread. A fresh array rather than a reused buffer: it cannot alias anything a backend
  might keep, and the allocator recycles it cheaply. The backend's output is copied once per batch
  (at most ``max_batch x classes`` floats) and made read-only, so results never alias a buffer the
  backend reuses for the next batch; each :class:`ItemResult` holds a row view of that copy.
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
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import queue
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..backends.base import Backend, BackendError, GatheringBackend
from .recorder import NULL_RECORDER, Recorder

__all__ = [
    "Batcher",
    "BatcherClosedError",
    "BatcherSettings",
    "BatcherStats",
    "Caller",
    "DeadlineExpiredError",
    "ItemResult",
    "QueueFullError",
]

logger = logging.getLogger(__name__)

# Who a request is for, as far as fairness goes: any hashable key the servicer chooses.
Caller = Hashable
# The default memory budget: about 1,700 preprocessed 224x224 frames.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 1024 * 1024


class QueueFullError(Exception):
    """The queue has no room for all images of the request; nothing of it was admitted."""


class BatcherClosedError(Exception):
    """The batcher is closed (or closing) and admits no more work."""


class DeadlineExpiredError(Exception):
    """The request's deadline passed before its images were run; they were never computed."""


@dataclass(frozen=True, slots=True)
class BatcherSettings:
    """How the batcher trades latency for throughput.

    ``max_batch`` must not exceed the backend's ``max_batch``; ``max_queue`` must be at least
    ``max_batch`` so that any valid request can be admitted into an empty queue.
    """

    max_batch: int = 32
    # Wait at most this long after the oldest queued request for more. 0 (as Triton's default)
    # dispatches at once when the worker is free; batches still form from what queues while a
    # batch computes, so waiting only adds latency unless the backend idles between arrivals.
    max_delay_us: int = 0
    max_queue: int = 256  # images waiting (not counting the batch computing)
    # Bytes of images admitted (waiting or computing): what bounds the server's memory.
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {self.max_batch}")
        if self.max_delay_us < 0:
            raise ValueError(f"max_delay_us must not be negative, not {self.max_delay_us}")
        if self.max_queue < self.max_batch:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_batch ({self.max_batch})"
            )
        if self.memory_budget_bytes < 1:
            raise ValueError(
                f"memory_budget_bytes must be positive, not {self.memory_budget_bytes}"
            )


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The result for one image.

    ``probabilities`` is a read-only float32 [C] row. ``queue_us`` is the time from admission to
    the batch being taken from the queue, ``compute_us`` the duration of the batch's
    ``backend.infer`` call, ``batch_size`` the number of images in that batch.
    """

    probabilities: NDArray[np.float32]
    queue_us: int
    compute_us: int
    batch_size: int


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """A snapshot of the batcher's counters; every count is in images unless it says batches."""

    queued: int  # waiting now
    batches_run: int  # successful backend.infer calls
    images_run: int
    failed_batches: int  # backend.infer calls that raised
    failed_images: int
    dropped_expired: int  # deadline passed before compute (including on arrival)
    dropped_cancelled: int  # caller cancelled while queued
    rejected_full: int  # refused with QueueFullError (queue or memory budget)
    admitted_bytes: int  # bytes of images admitted now (waiting or computing)
    callers: int  # callers with images admitted now
    # Cumulative durations of the images run, in nanoseconds (for protocols' statistics):
    queue_ns: int = 0  # admission to dispatch, summed over images
    compute_ns: int = 0  # their batch's backend.infer, summed over images
    last_run_unix_ns: int = 0  # wall-clock time the last batch finished; 0 before the first


class _State(enum.Enum):
    QUEUED = enum.auto()
    RUNNING = enum.auto()
    DONE = enum.auto()


class _Caller:
    """What the batcher knows of one caller while it has images admitted."""

    __slots__ = ("finish", "images")

    def __init__(self) -> None:
        self.finish = 0  # virtual time at which its last queued request ends
        self.images = 0  # images admitted (waiting or computing)


class _Request(asyncio.Future[list[ItemResult]]):
    """One ``submit`` call, and the future of its results: its images travel together.

    The request is its own future, so that cancelling it (directly, or by cancelling a task
    awaiting it) withdraws it from the queue at once without a done-callback per request: a
    callback costs a scheduled event-loop handle on every completion, paid by every frame.
    """

    __slots__ = (
        "batcher",
        "caller",
        "deadline",
        "enqueued_ns",
        "images",
        "n",
        "nbytes",
        "start",
        "state",
        "timer",
    )

    def __init__(
        self,
        batcher: Batcher,
        images: NDArray[np.uint8],
        deadline: float | None,
        caller: Caller,
        start: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(loop=loop)
        self.batcher = batcher
        # None once the request is finished: a result waiting to be sent holds no frame.
        self.images: NDArray[np.uint8] | None = images
        self.n: int = images.shape[0]
        self.nbytes: int = images.nbytes
        self.deadline = deadline
        self.caller = caller
        self.start = start  # virtual start time: the fair order
        self.enqueued_ns = time.monotonic_ns()
        self.state = _State.QUEUED
        self.timer: asyncio.TimerHandle | None = None

    def __lt__(self, other: _Request) -> bool:
        # Heap order; equal start times (callers with nothing else queued) in arrival order.
        return (self.start, self.enqueued_ns) < (other.start, other.enqueued_ns)

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.state is _State.QUEUED:
            self.batcher._withdraw(self)
        return True


class _Batch:
    """Requests taken from the queue together, on their way to and from the worker."""

    __slots__ = ("arrays", "dispatched_ns", "requests", "size")

    def __init__(self, requests: list[_Request], arrays: list[NDArray[np.uint8]]) -> None:
        self.requests = requests
        self.arrays = arrays  # the requests' images, for the worker; emptied once computed
        self.size = sum(req.n for req in requests)
        self.dispatched_ns = time.monotonic_ns()


class Batcher:
    """Gathers images from all callers into batches and runs them on one worker thread.

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
        self._backend = backend
        self._settings = settings
        self._recorder = recorder
        self._delay_ns = settings.max_delay_us * 1000
        # Waiting requests in fair order (a heap on their virtual start time). Withdrawn ones
        # stay in it, marked DONE, until they surface or the heap is compacted.
        self._heap: list[_Request] = []
        self._dead = 0  # withdrawn requests still in the heap
        self._vtime = 0  # virtual time: the start time of the last request taken
        self._callers: dict[Caller, _Caller] = {}
        self._queued = 0
        self._admitted_bytes = 0
        # The last quarter of each limit is for callers with modest demand (see the docstring).
        self._queue_reserve = settings.max_queue // 4
        self._budget_reserve = settings.memory_budget_bytes // 4
        self._room_waiters: list[asyncio.Future[None]] = []
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        # Backends that overlap batches (TensorRT: copies of one under compute of another) get
        # that many workers; the others get one, so infer is only ever called from one thread.
        self._depth = backend.max_concurrent_batches
        # A backend that gathers the requests' frames itself gets them unjoined: one copy
        # straight into its input buffer instead of a concatenation and then a second copy.
        self._gather = backend if isinstance(backend, GatheringBackend) else None
        if self._depth < 1:
            raise ValueError(f"backend max_concurrent_batches must be >= 1, got {self._depth}")
        self._workers: list[threading.Thread] = []
        self._running: set[_Batch] = set()  # batches handed to the workers
        self._timer: asyncio.TimerHandle | None = None  # fires when the oldest request is due
        self._timer_due_ns = 0
        self._dispatch_soon = False  # a _dispatch_soon_now callback is scheduled
        self._drained: asyncio.Event | None = None
        self._batches_run = 0
        self._images_run = 0
        self._failed_batches = 0
        self._failed_images = 0
        self._dropped_expired = 0
        self._dropped_cancelled = 0
        self._rejected_full = 0
        self._queue_ns = 0
        self._compute_ns = 0
        self._last_run_unix_ns = 0

    @property
    def settings(self) -> BatcherSettings:
        """The settings the batcher was built with."""
        return self._settings

    @property
    def queued(self) -> int:
        """Images waiting in the queue now (not counting the batch computing)."""
        return self._queued

    @property
    def admitted_bytes(self) -> int:
        """Bytes of images admitted now, waiting or computing (what the memory budget bounds)."""
        return self._admitted_bytes

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (or the dispatcher stopped): no work is admitted."""
        return self._closing

    @property
    def stats(self) -> BatcherStats:
        """A snapshot of the counters."""
        return BatcherStats(
            queued=self._queued,
            batches_run=self._batches_run,
            images_run=self._images_run,
            failed_batches=self._failed_batches,
            failed_images=self._failed_images,
            dropped_expired=self._dropped_expired,
            dropped_cancelled=self._dropped_cancelled,
            rejected_full=self._rejected_full,
            admitted_bytes=self._admitted_bytes,
            callers=len(self._callers),
            queue_ns=self._queue_ns,
            compute_ns=self._compute_ns,
            last_run_unix_ns=self._last_run_unix_ns,
        )

    async def start(self) -> None:
        """Start the worker thread; the batcher then serves callers on the running event loop."""
        if self._closing:
            raise BatcherClosedError("the batcher is closed")
        if self._workers:
            raise RuntimeError("the batcher is already started")
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()
        self._workers = [
            threading.Thread(target=self._work, name=f"framecast-infer-{i}", daemon=True)
            for i in range(self._depth)
        ]
        for worker in self._workers:
            worker.start()

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
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._dropped_expired += n
            raise DeadlineExpiredError("the deadline had already passed on arrival")
        state = self._callers.get(caller)
        refusal = self._refusal(state, n, images.nbytes)
        if refusal is not None:
            self._rejected_full += n
            raise QueueFullError(refusal)
        if state is None:
            state = self._callers[caller] = _Caller()
        start = max(self._vtime, state.finish)
        state.finish = start + n
        state.images += n
        req = _Request(self, images, deadline, caller, start, loop)
        if deadline is not None:
            req.timer = loop.call_later(deadline - now, self._expire, req)
        heapq.heappush(self._heap, req)
        self._queued += n
        self._admitted_bytes += req.nbytes
        if self._queued >= self._settings.max_batch:
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
        return self._refusal(self._callers.get(caller), images.shape[0], images.nbytes) is None

    async def wait_for_room(self, images: NDArray[np.uint8], *, caller: Caller = None) -> None:
        """Wait until ``images`` fit the queue and the memory budget for ``caller``.

        What a stream does instead of failing its frames when the server is full: it stops
        reading, and HTTP/2 flow control pushes back on the client. Raises
        :class:`BatcherClosedError` once closing.
        """
        loop = asyncio.get_running_loop()
        while not self._closing and not self.has_room(images, caller=caller):
            waiter: asyncio.Future[None] = loop.create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
        if self._closing:
            raise BatcherClosedError("the batcher is closed")

    def _refusal(self, state: _Caller | None, n: int, nbytes: int) -> str | None:
        """Why a request of ``n`` images (``nbytes``) cannot be admitted now; None if it can."""
        settings = self._settings
        modest = (0 if state is None else state.images) + n <= settings.max_batch
        queue_limit = settings.max_queue - (0 if modest else self._queue_reserve)
        if self._queued + n > queue_limit:
            kept = "" if modest else f" (the last {self._queue_reserve} are kept for others)"
            return (
                f"queue full: {self._queued} of {settings.max_queue} images waiting{kept}, "
                f"no room for {n} more"
            )
        budget = settings.memory_budget_bytes
        budget_limit = budget - (0 if modest else self._budget_reserve)
        if self._admitted_bytes + nbytes > budget_limit:
            mib = 1024 * 1024
            return (
                f"memory budget spent: {self._admitted_bytes / mib:.1f} of {budget / mib:.1f} MiB "
                f"of images admitted, no room for {nbytes / mib:.2f} MiB more"
            )
        return None

    def _withdraw(self, req: _Request) -> None:
        """A queued request was cancelled: take it out of the queue now."""
        self._remove(req)
        self._dropped_cancelled += req.n

    async def close(self) -> None:
        """Stop admitting work, run everything already queued, then stop the worker thread.

        New ``submit`` calls fail with :class:`BatcherClosedError` from the moment this is
        called. Queued requests are dispatched without waiting for ``max_delay``. Idempotent.
        """
        self._closing = True
        self._wake_room_waiters()
        if self._loop is None or self._drained is None:
            return  # never started
        self._maybe_dispatch()
        # Shielded so that a cancelled close() still lets the queued work drain.
        await asyncio.shield(self._drained.wait())
        workers, self._workers = self._workers, []
        for _ in workers:
            self._jobs.put(None)
        # The last batch has been delivered, so the workers are idle: this only joins.
        for worker in workers:
            await asyncio.to_thread(worker.join)

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

    def _remove(self, req: _Request) -> None:
        """Take a still-queued request out of the queue (cancelled or expired).

        Its heap entry stays until it surfaces (marked DONE); the heap is rebuilt when such
        entries outnumber the live ones, so withdrawn work cannot pile up.
        """
        self._queued -= req.n
        self._finish(req)
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        self._dead += 1
        if self._dead > 32 and 2 * self._dead > len(self._heap):
            self._heap = [r for r in self._heap if r.state is _State.QUEUED]
            heapq.heapify(self._heap)
            self._dead = 0

    def _finish(self, req: _Request) -> None:
        """The request leaves the admitted set: release its images, its budget and its caller."""
        req.state = _State.DONE
        req.images = None
        self._admitted_bytes -= req.nbytes
        state = self._callers.get(req.caller)
        if state is not None:
            state.images -= req.n
            if state.images <= 0:
                del self._callers[req.caller]
        if self._room_waiters:
            self._wake_room_waiters()

    def _wake_room_waiters(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _expire(self, req: _Request) -> None:
        """Deadline timer: drop the request if it is still waiting."""
        if req.state is not _State.QUEUED:
            return
        self._remove(req)
        self._fail_expired(req)

    def _fail_expired(self, req: _Request) -> None:
        self._dropped_expired += req.n
        if not req.done():
            req.set_exception(
                DeadlineExpiredError("the deadline passed while the request was queued")
            )

    def _oldest_enqueued_ns(self) -> int:
        return min(r.enqueued_ns for r in self._heap if r.state is _State.QUEUED)

    def _maybe_dispatch(self) -> None:
        """Hand due batches to free workers; else make sure a timer will ask again.

        Called on the event loop whenever something changes: a request admitted, a batch done,
        the delay timer fired, close(). No task sits in between, so an idle batcher costs a
        request no event-loop hop on its way to the worker.
        """
        while len(self._running) < self._depth and self._queued:
            if self._delay_ns and not self._closing and self._queued < self._settings.max_batch:
                due_ns = self._oldest_enqueued_ns() + self._delay_ns
                if due_ns > time.monotonic_ns():
                    self._arm_timer(due_ns)
                    return
            batch, arrays = self._take_batch()
            if batch:  # else every candidate was dropped: look again
                running = _Batch(batch, arrays)
                self._running.add(running)
                self._jobs.put(running)
        if self._closing and not self._running and not self._queued and self._drained:
            self._drained.set()

    def _dispatch_soon_now(self) -> None:
        self._dispatch_soon = False
        self._maybe_dispatch()

    def _arm_timer(self, due_ns: int) -> None:
        if self._timer is not None:
            if self._timer_due_ns <= due_ns:
                return  # an earlier wake-up is coming; it re-evaluates
            self._timer.cancel()
        assert self._loop is not None
        delay_s = (due_ns - time.monotonic_ns()) / 1e9
        self._timer_due_ns = due_ns
        self._timer = self._loop.call_later(max(delay_s, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._maybe_dispatch()

    def _work(self) -> None:
        """Worker thread: run each batch handed over, post the outcome back to the loop."""
        while (batch := self._jobs.get()) is not None:
            outcome: tuple[NDArray[np.float32], int] | BaseException
            try:
                outcome = self._compute(batch.arrays, batch.size)
            except BaseException as exc:  # delivered to the callers, never lost here
                # Logged here with its traceback, then sent on without it: the traceback's
                # frames hold this batch's images and the exception itself (a reference cycle
                # only the cyclic garbage collector would free).
                logger.error("backend failed on a batch of %d images", batch.size, exc_info=exc)
                outcome = exc.with_traceback(None)
            batch.arrays = []
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._on_batch_done, batch, outcome)
            except RuntimeError:
                return  # the event loop is closed: nobody is left to deliver to
            # Hold nothing of this batch while waiting for the next one.
            del batch, outcome

    def _on_batch_done(
        self, batch: _Batch, outcome: tuple[NDArray[np.float32], int] | BaseException
    ) -> None:
        try:
            if isinstance(outcome, BaseException):
                self._fail_batch(batch, outcome)
            else:
                self._deliver(batch, *outcome)
        finally:
            self._running.discard(batch)
            self._maybe_dispatch()

    def _take_batch(self) -> tuple[list[_Request], list[NDArray[np.uint8]]]:
        """Pop whole requests in fair order while they fit; drop expired ones on the way."""
        batch: list[_Request] = []
        arrays: list[NDArray[np.uint8]] = []
        size = 0
        shape: tuple[int, ...] | None = None
        now = time.monotonic()
        while self._heap:  # not a local: _remove may rebuild the heap
            req = self._heap[0]
            if req.state is not _State.QUEUED:
                heapq.heappop(self._heap)  # withdrawn earlier
                self._dead -= 1
                continue
            if req.done():
                # Defensive: cancelled without submit() seeing it; never compute it.
                self._remove(req)
                self._dropped_cancelled += req.n
                continue
            if req.deadline is not None and req.deadline <= now:
                self._remove(req)
                self._fail_expired(req)
                continue
            assert req.images is not None
            if size + req.n > self._settings.max_batch:
                break
            if shape is not None and req.images.shape[1:] != shape:
                break
            shape = req.images.shape[1:]
            heapq.heappop(self._heap)
            self._vtime = req.start
            self._queued -= req.n
            req.state = _State.RUNNING
            if req.timer is not None:
                req.timer.cancel()  # a running batch is not interrupted
                req.timer = None
            batch.append(req)
            arrays.append(req.images)
            size += req.n
        return batch, arrays

    def _fail_batch(self, batch: _Batch, exc: BaseException) -> None:
        size = batch.size
        self._failed_batches += 1
        self._failed_images += size
        for req in batch.requests:
            self._finish(req)
            if not req.done():
                # One exception object per caller: a shared one would collect every caller's
                # traceback as each re-raises it.
                error = BackendError(f"inference failed for a batch of {size} images: {exc}")
                error.__cause__ = exc
                req.set_exception(error)

    def _deliver(self, batch: _Batch, probabilities: NDArray[np.float32], compute_ns: int) -> None:
        size = batch.size
        self._batches_run += 1
        self._images_run += size
        self._compute_ns += compute_ns * size
        self._last_run_unix_ns = time.time_ns()
        compute_us = compute_ns // 1000
        offset = 0
        waits: list[int] = []
        for req in batch.requests:
            self._finish(req)
            queue_ns = batch.dispatched_ns - req.enqueued_ns
            waits += [queue_ns] * req.n
            self._queue_ns += queue_ns * req.n
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

    def _compute(
        self, arrays: list[NDArray[np.uint8]], size: int
    ) -> tuple[NDArray[np.float32], int]:
        """Worker thread: build the input, call the backend once, copy out the output."""
        if self._gather is not None:
            started = time.monotonic_ns()
            output = self._gather.infer_parts(arrays)
        else:
            if len(arrays) == 1:
                images = np.ascontiguousarray(arrays[0])
            else:
                images = np.concatenate(arrays, axis=0)
            started = time.monotonic_ns()
            output = self._backend.infer(images)
        compute_ns = time.monotonic_ns() - started
        probabilities = np.array(output, dtype=np.float32, copy=True)
        if probabilities.ndim != 2 or probabilities.shape[0] != size:
            raise BackendError(
                f"backend returned shape {list(probabilities.shape)} for a batch of {size} images"
            )
        probabilities.flags.writeable = False
        return probabilities, compute_ns
