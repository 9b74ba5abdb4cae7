"""The batcher's timers and threads: the batch delay timer, and the threads calling the backend.

* **Threads.** A backend runs ``max_concurrent_batches`` batches at once, each handed to its
  own thread: 1 for ONNX Runtime (infer only ever sees one thread), 2 for TensorRT (one batch's
  copies overlap the other's compute). The event loop never runs inference.
* **Copies.** A batch of one request passes the caller's array to the backend as is (no copy if
  it is C-contiguous). A batch of several requests is concatenated once into a fresh array, on
  the worker thread (a backend that gathers the parts itself gets them unjoined). A fresh array
  rather than a reused buffer: it cannot alias anything a backend might keep, and the allocator
  recycles it cheaply. The backend's output is copied once per batch (at most ``max_batch x
  classes`` floats) and made read-only, so results never alias a buffer the backend reuses.
* **No reference cycles.** Exceptions handed back carry no traceback (the worker logs it), and
  a worker thread holds no batch while it waits for the next one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from ...backends.base import Backend, BackendError, GatheringBackend
from .fair_queue import Request

logger = logging.getLogger(__name__)

# What a worker posts back for a batch: the probabilities and the compute time in ns, or the
# exception the backend raised.
Outcome = tuple[NDArray[np.float32], int] | BaseException


class Batch:
    """Requests taken from the queue together, on their way to and from a worker."""

    __slots__ = ("arrays", "dispatched_ns", "requests", "size")

    def __init__(self, requests: list[Request], arrays: list[NDArray[np.uint8]]) -> None:
        self.requests = requests
        self.arrays = arrays  # the requests' images, for the worker; emptied once computed
        self.size = sum(req.n for req in requests)
        self.dispatched_ns = time.monotonic_ns()


class InferenceThreads:
    """The threads that make one ``backend.infer`` call per batch and post the outcome back."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        # Backends that overlap batches (TensorRT: copies of one under compute of another) get
        # that many workers; the others get one, so infer is only ever called from one thread.
        self.depth = backend.max_concurrent_batches
        if self.depth < 1:
            raise ValueError(f"backend max_concurrent_batches must be >= 1, got {self.depth}")
        # A backend that gathers the requests' frames itself gets them unjoined: one copy
        # straight into its input buffer instead of a concatenation and then a second copy.
        self._gather = backend if isinstance(backend, GatheringBackend) else None
        self._jobs: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_done: Callable[[Batch, Outcome], None] | None = None

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(
        self, loop: asyncio.AbstractEventLoop, on_done: Callable[[Batch, Outcome], None]
    ) -> None:
        """Start the threads; each outcome is delivered by ``on_done`` on ``loop``."""
        self._loop = loop
        self._on_done = on_done
        self._threads = [
            threading.Thread(target=self._work, name=f"framecast-infer-{i}", daemon=True)
            for i in range(self.depth)
        ]
        for thread in self._threads:
            thread.start()

    def put(self, batch: Batch) -> None:
        """Hand a batch to the next free thread."""
        self._jobs.put(batch)

    async def stop(self) -> None:
        """Stop the threads once they are idle (every batch delivered) and join them."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            await asyncio.to_thread(thread.join)

    def _work(self) -> None:
        """Worker thread: run each batch handed over, post the outcome back to the loop."""
        loop, on_done = self._loop, self._on_done
        assert loop is not None
        assert on_done is not None
        while (batch := self._jobs.get()) is not None:
            outcome: Outcome
            try:
                outcome = self._compute(batch.arrays, batch.size)
            except BaseException as exc:  # delivered to the callers, never lost here
                # Logged here with its traceback, then sent on without it: the traceback's
                # frames hold this batch's images and the exception itself (a reference cycle
                # only the cyclic garbage collector would free).
                logger.error("backend failed on a batch of %d images", batch.size, exc_info=exc)
                outcome = exc.with_traceback(None)
            batch.arrays = []
            try:
                loop.call_soon_threadsafe(on_done, batch, outcome)
            except RuntimeError:
                return  # the event loop is closed: nobody is left to deliver to
            # Hold nothing of this batch while waiting for the next one.
            del batch, outcome

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


class DelayTimer:
    """One event-loop timer for the batch delay: calls ``callback`` when the oldest is due."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._due_ns = 0

    def arm(self, loop: asyncio.AbstractEventLoop, due_ns: int) -> None:
        """Make sure the callback runs by ``due_ns`` (``time.monotonic_ns``)."""
        if self._handle is not None:
            if self._due_ns <= due_ns:
                return  # an earlier wake-up is coming; it re-evaluates
            self._handle.cancel()
        delay_s = (due_ns - time.monotonic_ns()) / 1e9
        self._due_ns = due_ns
        self._handle = loop.call_later(max(delay_s, 0.0), self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._callback()
