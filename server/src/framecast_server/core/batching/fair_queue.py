"""The batcher's queueing policy: who is admitted, in which order requests leave, what is dropped.

* **Bounds.** At most ``max_queue`` images wait, and the images admitted (waiting or computing)
  hold at most ``memory_budget_bytes``. A request that does not fit is refused whole with
  :class:`QueueFullError`. The last quarter of both limits is kept for callers with modest
  demand (at most ``max_batch`` images admitted, this request included), so a greedy caller
  cannot lock the others out. A finished or dropped request lets go of its images at once, and
  wakes whoever waits for room.
* **Fair order.** Start-time fair queueing counted in images: a caller's request starts at the
  later of the virtual time and the end of that caller's previous request; each caller's own
  requests stay first in, first out; equal start times go in arrival order.
* **Dropping.** A request whose deadline passes while queued is removed at once (a timer); one
  whose future is cancelled is withdrawn at once. Deadlines are checked again when taken.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import time

import numpy as np
from numpy.typing import NDArray

from .settings import BatcherSettings, Caller, DeadlineExpiredError, ItemResult, QueueFullError
from .stats import Counters


class State(enum.Enum):
    """Where a request is: waiting in the queue, in a batch being computed, or finished."""

    QUEUED = enum.auto()
    RUNNING = enum.auto()
    DONE = enum.auto()


class _CallerState:
    """What the queue knows of one caller while it has images admitted."""

    __slots__ = ("finish", "images")

    def __init__(self) -> None:
        self.finish = 0  # virtual time at which its last queued request ends
        self.images = 0  # images admitted (waiting or computing)


class Request(asyncio.Future[list[ItemResult]]):
    """One ``submit`` call, and the future of its results: its images travel together.

    The request is its own future, so that cancelling it (directly, or by cancelling a task
    awaiting it) withdraws it from the queue at once without a done-callback per request: a
    callback costs a scheduled event-loop handle on every completion, paid by every frame.
    """

    __slots__ = (
        "caller",
        "deadline",
        "enqueued_ns",
        "images",
        "n",
        "nbytes",
        "queue",
        "start",
        "state",
        "timer",
    )

    def __init__(
        self,
        queue: FairQueue,
        images: NDArray[np.uint8],
        deadline: float | None,
        caller: Caller,
        start: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(loop=loop)
        self.queue = queue
        # None once the request is finished: a result waiting to be sent holds no frame.
        self.images: NDArray[np.uint8] | None = images
        self.n: int = images.shape[0]
        self.nbytes: int = images.nbytes
        self.deadline = deadline
        self.caller = caller
        self.start = start  # virtual start time: the fair order
        self.enqueued_ns = time.monotonic_ns()
        self.state = State.QUEUED
        self.timer: asyncio.TimerHandle | None = None

    def __lt__(self, other: Request) -> bool:
        # Heap order; equal start times (callers with nothing else queued) in arrival order.
        return (self.start, self.enqueued_ns) < (other.start, other.enqueued_ns)

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        if self.state is State.QUEUED:
            self.queue.withdraw(self)
        return True


class FairQueue:
    """The requests admitted and not yet finished, waiting ones in fair order.

    Used from the batcher's event loop only. ``queued`` (images waiting) and
    ``admitted_bytes`` (images waiting or computing) are read directly.
    """

    def __init__(self, settings: BatcherSettings, counters: Counters) -> None:
        self._settings = settings
        self._counters = counters
        # Waiting requests in fair order (a heap on their virtual start time). Withdrawn ones
        # stay in it, marked DONE, until they surface or the heap is compacted.
        self._heap: list[Request] = []
        self._dead = 0  # withdrawn requests still in the heap
        self._vtime = 0  # virtual time: the start time of the last request taken
        self._callers: dict[Caller, _CallerState] = {}
        self.queued = 0
        self.admitted_bytes = 0
        # The last quarter of each limit is for callers with modest demand (module docstring).
        self._queue_reserve = settings.max_queue // 4
        self._budget_reserve = settings.memory_budget_bytes // 4
        self._room_waiters: list[asyncio.Future[None]] = []

    @property
    def callers(self) -> int:
        """Callers with images admitted now."""
        return len(self._callers)

    def admit(
        self,
        images: NDArray[np.uint8],
        n: int,
        deadline: float | None,
        caller: Caller,
        loop: asyncio.AbstractEventLoop,
    ) -> Request:
        """Queue ``n`` images for ``caller``, or raise: expired on arrival, or no room."""
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            self._counters.dropped_expired += n
            raise DeadlineExpiredError("the deadline had already passed on arrival")
        state = self._callers.get(caller)
        refusal = self._refusal(state, n, images.nbytes)
        if refusal is not None:
            self._counters.rejected_full += n
            raise QueueFullError(refusal)
        if state is None:
            state = self._callers[caller] = _CallerState()
        start = max(self._vtime, state.finish)
        state.finish = start + n
        state.images += n
        req = Request(self, images, deadline, caller, start, loop)
        if deadline is not None:
            req.timer = loop.call_later(deadline - now, self._expire, req)
        heapq.heappush(self._heap, req)
        self.queued += n
        self.admitted_bytes += req.nbytes
        return req

    def has_room(self, images: NDArray[np.uint8], caller: Caller) -> bool:
        """Whether ``admit`` would take ``images`` for ``caller`` now (limits only)."""
        return self._refusal(self._callers.get(caller), images.shape[0], images.nbytes) is None

    def room_waiter(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future set when a request lets go of its images (or on ``wake_room_waiters``)."""
        waiter: asyncio.Future[None] = loop.create_future()
        self._room_waiters.append(waiter)
        return waiter

    def wake_room_waiters(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _refusal(self, state: _CallerState | None, n: int, nbytes: int) -> str | None:
        """Why a request of ``n`` images (``nbytes``) cannot be admitted now; None if it can."""
        settings = self._settings
        modest = (0 if state is None else state.images) + n <= settings.max_batch
        queue_limit = settings.max_queue - (0 if modest else self._queue_reserve)
        if self.queued + n > queue_limit:
            kept = "" if modest else f" (the last {self._queue_reserve} are kept for others)"
            return (
                f"queue full: {self.queued} of {settings.max_queue} images waiting{kept}, "
                f"no room for {n} more"
            )
        budget = settings.memory_budget_bytes
        budget_limit = budget - (0 if modest else self._budget_reserve)
        if self.admitted_bytes + nbytes > budget_limit:
            mib = 1024 * 1024
            return (
                f"memory budget spent: {self.admitted_bytes / mib:.1f} of {budget / mib:.1f} MiB "
                f"of images admitted, no room for {nbytes / mib:.2f} MiB more"
            )
        return None

    def withdraw(self, req: Request) -> None:
        """A queued request was cancelled: take it out of the queue now."""
        self._remove(req)
        self._counters.dropped_cancelled += req.n

    def oldest_enqueued_ns(self) -> int:
        """When the request waiting longest was admitted (``time.monotonic_ns``)."""
        return min(r.enqueued_ns for r in self._heap if r.state is State.QUEUED)

    def take(self) -> tuple[list[Request], list[NDArray[np.uint8]]]:
        """Pop whole requests in fair order while they fit; drop expired ones on the way.

        A request is never split: one that does not fit in the room left, or whose images
        differ in height or width, closes the batch.
        """
        max_batch = self._settings.max_batch
        batch: list[Request] = []
        arrays: list[NDArray[np.uint8]] = []
        size = 0
        shape: tuple[int, ...] | None = None
        now = time.monotonic()
        while self._heap:  # not a local: _remove may rebuild the heap
            req = self._heap[0]
            if req.state is not State.QUEUED:
                heapq.heappop(self._heap)  # withdrawn earlier
                self._dead -= 1
                continue
            if req.done():
                # Defensive: cancelled without submit() seeing it; never compute it.
                self._remove(req)
                self._counters.dropped_cancelled += req.n
                continue
            if req.deadline is not None and req.deadline <= now:
                self._remove(req)
                self._fail_expired(req)
                continue
            assert req.images is not None
            if size + req.n > max_batch:
                break
            if shape is not None and req.images.shape[1:] != shape:
                break
            shape = req.images.shape[1:]
            heapq.heappop(self._heap)
            self._vtime = req.start
            self.queued -= req.n
            req.state = State.RUNNING
            if req.timer is not None:
                req.timer.cancel()  # a running batch is not interrupted
                req.timer = None
            batch.append(req)
            arrays.append(req.images)
            size += req.n
        return batch, arrays

    def finish(self, req: Request) -> None:
        """The request leaves the admitted set: release its images, its budget and its caller."""
        req.state = State.DONE
        req.images = None
        self.admitted_bytes -= req.nbytes
        state = self._callers.get(req.caller)
        if state is not None:
            state.images -= req.n
            if state.images <= 0:
                del self._callers[req.caller]
        if self._room_waiters:
            self.wake_room_waiters()

    def _remove(self, req: Request) -> None:
        """Take a still-queued request out of the queue (cancelled or expired).

        Its heap entry stays until it surfaces (marked DONE); the heap is rebuilt when such
        entries outnumber the live ones, so withdrawn work cannot pile up.
        """
        self.queued -= req.n
        self.finish(req)
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        self._dead += 1
        if self._dead > 32 and 2 * self._dead > len(self._heap):
            self._heap = [r for r in self._heap if r.state is State.QUEUED]
            heapq.heapify(self._heap)
            self._dead = 0

    def _expire(self, req: Request) -> None:
        """Deadline timer: drop the request if it is still waiting."""
        if req.state is not State.QUEUED:
            return
        self._remove(req)
        self._fail_expired(req)

    def _fail_expired(self, req: Request) -> None:
        self._counters.dropped_expired += req.n
        if not req.done():
            req.set_exception(
                DeadlineExpiredError("the deadline passed while the request was queued")
            )
