"""The inference process's side of the hand-off: one batcher, fed by every front end.

:class:`InferenceService` listens on the link's Unix socket, submits each front end's
requests, as views of that front end's shared region, to its one :class:`Batcher`, and
answers each on its front end's socket. With a backend that can register host memory
(TensorRT: ``cudaHostRegister``), the regions are registered at start, so a batch's
host-to-device copies read the frames where the front ends wrote them: no host copy per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ...backends.base import Backend, BackendError, HostRegisteringBackend
from ...core.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherSettings,
    Caller,
    DeadlineExpiredError,
    ItemResult,
    QueueFullError,
)
from ...core.memory import MemoryTrimmer
from .link import (
    ADMITTED,
    CANCEL,
    CANCEL_BODY,
    ERROR,
    ERROR_BODY,
    ERRORS,
    GENERATION,
    HEADER,
    HELLO,
    HELLO_BODY,
    QUEUED,
    READY,
    READY_BODY,
    RESULT,
    RESULT_BODY,
    RUN_STATS,
    STATS_AT,
    SUBMIT,
    SUBMIT_BODY,
    Counters,
    InferenceLink,
    Records,
    attach,
    close_region,
    record,
)

logger = logging.getLogger(__name__)


class _FrontEnd:
    """The inference process's view of one connected front end."""

    __slots__ = ("alive", "frames", "index", "pending", "records")

    def __init__(self, index: int, frames: NDArray[np.uint8], records: Records):
        self.index = index
        self.frames = frames
        self.records = records
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.alive = True


class InferenceService:
    """The inference process's side: one batcher, fed by every front end (see module doc)."""

    def __init__(
        self,
        link: InferenceLink,
        backend: Backend,
        settings: BatcherSettings,
        *,
        input_size: int,
        recorder: Any = None,
    ) -> None:
        self._link = link
        self._backend = backend
        self._settings = settings
        self._input_size = input_size
        self._classes = 0  # known after the warm-up batch
        self.batcher = (
            Batcher(backend, settings) if recorder is None else Batcher(backend, settings, recorder)
        )
        # Read through the Counters object, never kept apart: its view goes before its block.
        self._counters = Counters(link.counters_name)
        # Every front end's region, attached once for the life of the process (a front end
        # that is replaced gets the same region again).
        self._frames: list[NDArray[np.uint8]] = []  # before the regions they view
        self._regions: list[shared_memory.SharedMemory] = []
        self._registered: list[NDArray[np.uint8]] = []
        self._front_ends: dict[int, _FrontEnd] = {}
        self._server: asyncio.AbstractServer | None = None
        self._published_runs = -1  # batches run or failed when the statistics were published
        self._ready = b""
        # Freed memory back to the system after bursts, as in every server process: only when
        # nothing is queued or admitted (a trim holds malloc's locks while it runs).
        batcher = self.batcher
        self._trimmer = MemoryTrimmer(lambda: batcher.admitted_bytes == 0 and batcher.queued == 0)

    @property
    def trimmer(self) -> MemoryTrimmer:
        """The process's memory trimmer (running between ``start`` and ``close``)."""
        return self._trimmer

    @property
    def registered_regions(self) -> int:
        """How many front-end regions the backend reads in place (registered with it)."""
        return len(self._registered)

    async def start(self) -> None:
        """Start the batcher, warm the backend up, then listen for front ends."""
        for name in self._link.region_names:
            region = attach(name)
            self._regions.append(region)
            self._frames.append(np.ndarray((region.size,), dtype=np.uint8, buffer=region.buf))
        if isinstance(self._backend, HostRegisteringBackend):
            await self._register(self._backend)
        await self.batcher.start()
        size = self._input_size
        # Warm-up through the batcher (the thread every later batch runs on), which also says
        # how wide a row of results is.
        warm = await self.batcher.submit(np.zeros((1, size, size, 3), dtype=np.uint8))
        self._classes = classes = int(warm[0].probabilities.shape[0])
        info = self._backend.info
        text = f"{info.name}\n{info.precision}\n{info.device}".encode()
        self._ready = record(
            READY, READY_BODY.pack(self._settings.max_batch, classes, len(text)) + text
        )
        self._publish()
        self._counters.values[GENERATION] += 1
        path = Path(self._link.socket_path)
        await asyncio.to_thread(path.unlink, missing_ok=True)  # a dead predecessor's socket
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connection, str(path))
        self._trimmer.start()

    async def _register(self, backend: HostRegisteringBackend) -> None:
        """Register every region with the backend, so its device copies read them in place;
        where that fails the batches are gathered in its own pinned buffer instead."""
        try:
            for frames in self._frames:
                await asyncio.to_thread(backend.register_host_memory, frames)
                self._registered.append(frames)
        except BackendError as exc:
            logger.warning(
                "the shared regions could not be registered with the backend (%s): each batch "
                "is copied into its pinned buffer first",
                exc,
            )
            return
        logger.info(
            "%d shared regions of %.0f MiB registered with the backend: batches are copied to "
            "the device from where the front ends wrote them",
            len(self._registered),
            self._link.region_bytes / 2**20,
        )

    def _connection(self) -> Records:
        state: list[_FrontEnd] = []

        def on_record(kind: int, body: memoryview) -> None:
            if kind == SUBMIT:
                self._submit(state[0], body)
            elif kind == CANCEL:
                (request_id,) = CANCEL_BODY.unpack(body)
                future = state[0].pending.get(request_id)
                if future is not None:
                    future.cancel()
            elif kind == HELLO:
                (index,) = HELLO_BODY.unpack(body)
                old = self._front_ends.get(index)
                if old is not None:
                    self._drop(old)  # its process was replaced
                front = _FrontEnd(index, self._frames[index], records)
                self._front_ends[index] = front
                state.append(front)
                records.send(self._ready)

        def on_lost() -> None:
            if state and self._front_ends.get(state[0].index) is state[0]:
                del self._front_ends[state[0].index]
                self._drop(state[0])

        records = Records(on_record, on_lost)
        return records

    def _drop(self, front: _FrontEnd) -> None:
        """A front end went away: withdraw what it has queued, answer it nothing more."""
        front.alive = False
        for future in list(front.pending.values()):
            future.cancel()
        front.pending.clear()

    def _submit(self, front: _FrontEnd, body: memoryview) -> None:
        request_id, offset, n, height, width, deadline = SUBMIT_BODY.unpack_from(body)
        caller: Caller = bytes(body[SUBMIT_BODY.size :]).decode() or None
        size = n * height * width * 3
        # A view: the frames stay where the front end wrote them until it is answered.
        images = front.frames[offset : offset + size].reshape(n, height, width, 3)
        limit = None if deadline == 0.0 else deadline
        try:
            future: asyncio.Future[Any] = self.batcher.submit_nowait(
                images, deadline=limit, caller=caller
            )
        except QueueFullError:
            # The front end saw room that another front end took first: wait for room here,
            # so an admitted request is never refused afterwards.
            future = asyncio.ensure_future(self._wait_then_submit(images, limit, caller))
        except Exception as exc:
            self._answer_error(front, request_id, exc)
            return
        front.pending[request_id] = future
        future.add_done_callback(lambda f: self._answer(front, request_id, f))
        self._publish()

    async def _wait_then_submit(
        self, images: NDArray[np.uint8], deadline: float | None, caller: Caller
    ) -> list[ItemResult]:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            await asyncio.wait_for(self.batcher.wait_for_room(images, caller=caller), timeout)
        except TimeoutError:
            raise DeadlineExpiredError("the deadline passed while waiting for room") from None
        return await self.batcher.submit_nowait(images, deadline=deadline, caller=caller)

    def _answer(self, front: _FrontEnd, request_id: int, future: asyncio.Future[Any]) -> None:
        self._publish()
        if front.pending.pop(request_id, None) is None or not front.alive:
            return
        if future.cancelled():
            self._answer_error(front, request_id, BatcherClosedError("cancelled"))
            return
        exc = future.exception()
        if exc is not None:
            self._answer_error(front, request_id, exc)
            return
        items: list[ItemResult] = future.result()
        first = items[0]
        rows = [item.probabilities.data for item in items]
        length = 1 + RESULT_BODY.size + sum(row.nbytes for row in rows)
        head = HEADER.pack(length, RESULT) + RESULT_BODY.pack(
            request_id, first.queue_us, first.compute_us, first.batch_size, self._classes
        )
        # The rows travel on the socket (4 KB a frame), joined once with their header: the
        # frames' units stay untouched, so a request whose answer is lost with this process
        # can be sent again as it was.
        front.records.send(b"".join([head, *rows]))

    def _answer_error(self, front: _FrontEnd, request_id: int, exc: BaseException) -> None:
        kind = next((i for i, t in enumerate(ERRORS) if isinstance(exc, t)), 0)
        front.records.send(record(ERROR, ERROR_BODY.pack(request_id, kind) + str(exc).encode()))

    def _publish(self) -> None:
        counters = self._counters.values
        batcher = self.batcher
        counters[QUEUED] = batcher.queued
        counters[ADMITTED] = batcher.admitted_bytes
        run = batcher.counters
        if run.batches_run + run.failed_batches != self._published_runs:
            # A batch ran or failed since the last time: the model's statistics too.
            self._published_runs = run.batches_run + run.failed_batches
            for i, name in enumerate(RUN_STATS, STATS_AT):
                counters[i] = getattr(run, name)

    async def close(self) -> None:
        """Stop listening, run what is queued, stop the batcher, unregister the regions."""
        if self._server is not None:
            self._server.close()
        await self._trimmer.stop()
        await self.batcher.close()
        for front in list(self._front_ends.values()):
            if front.records.transport is not None:
                front.records.transport.close()
        backend = self._backend
        if isinstance(backend, HostRegisteringBackend):
            # No batch runs any more: the device copies that read the regions are done.
            for frames in self._registered:
                await asyncio.to_thread(backend.unregister_host_memory, frames)
        self._registered.clear()
        self._front_ends.clear()
        self._frames.clear()
        for region in self._regions:
            close_region(region)
