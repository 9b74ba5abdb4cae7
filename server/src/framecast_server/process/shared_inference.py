"""One inference process for every front end: frames through shared memory, one batcher.

With ``--workers N --inference shared`` the N worker processes are front ends: gRPC, parsing,
validation, auth and metrics. None owns a backend. Each hands its frames to ONE inference
process, which owns the backend (one engine, one CUDA context) and runs ONE :class:`Batcher`
over the frames of every front end, so batches form from the whole host's load, in the same
fair order (the caller's identity crosses the hand-off), under the same limits and budget.

The hand-off:

* **Frames.** Each front end has its own shared-memory region (``multiprocessing.shared_memory``,
  made by the supervisor, as large as the memory budget). A request's images are copied once
  into a run of free frame-sized units there (the copy the batcher would otherwise keep in
  memory anyway); the inference process submits a view of that run to its batcher, and a
  GatheringBackend (TensorRT) gathers the batch straight from the region into its pinned
  input buffer: one host copy per batch, as with per-worker backends. (Registering the regions
  themselves as pinned memory, so that the host-to-device copy reads them in place, is not
  done.) The results (``n x classes`` float32) travel back on the socket, so a request's frames
  stay as they were until it is answered, and can be sent again if the inference process dies.
* **Control.** A Unix socket per front end carries small fixed records: hello, submit (request
  id, offset, shape, deadline, caller), cancel; and back: ready, result (timings and rows),
  error. No pickling; the records of one event-loop iteration leave in one write.
* **Limits.** Admission is decided in the front end, at once, as the servicers expect: against
  the inference process's queue and admitted bytes, which it publishes in a shared block after
  every change, with the batcher's own reserve rule for modest callers (counted per front
  end). Two front ends can both see the last room; the loser's request then waits in the
  inference process for room (``Batcher.wait_for_room``) rather than being refused after it
  was admitted, so a stream never loses a frame to that race and the budget holds exactly.
* **Failures.** A front end that dies: the inference process withdraws its queued requests and
  drops its results; nothing else notices. The inference process dying: every front end
  turns NOT_SERVING (``on_state``), keeps what it had in flight (and admits more, within the
  limits), reconnects when the supervisor has restarted it and sends it all again.

Nothing here imports grpc or prometheus: this is core, used by workers.py and app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from ..backends.base import Backend, BackendError, BackendInfo
from ..core.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherSettings,
    BatcherStats,
    Caller,
    DeadlineExpiredError,
    ItemResult,
    QueueFullError,
)

__all__ = [
    "InferenceLink",
    "InferenceProxy",
    "InferenceService",
    "RemoteBackend",
    "create_link",
    "unlink_link",
]

logger = logging.getLogger(__name__)

# Record kinds. Every record: u32 length of what follows, u8 kind, payload.
_HELLO, _SUBMIT, _CANCEL = 1, 2, 3
_READY, _RESULT, _ERROR = 11, 12, 13
_HEADER = struct.Struct("<IB")
_HELLO_BODY = struct.Struct("<I")  # front-end index
_READY_BODY = struct.Struct("<III")  # max batch, classes, length of the info text that follows
_SUBMIT_BODY = struct.Struct("<QQIIId")  # id, offset, n, height, width, deadline (0: none)
_CANCEL_BODY = struct.Struct("<Q")
_RESULT_BODY = struct.Struct("<QQQII")  # id, queue_us, compute_us, batch size, classes
_ERROR_BODY = struct.Struct("<QB")  # id, error kind; then the message
_ERRORS: tuple[type[Exception], ...] = (
    BackendError,
    DeadlineExpiredError,
    BatcherClosedError,
    QueueFullError,
    ValueError,
)
# The published counters of the inference process: images queued, bytes admitted, generation
# (bumped at every start, so a front end sees a restart).
_COUNTERS = 3


@dataclass(frozen=True, slots=True)
class InferenceLink:
    """What a front end and the inference process need to find each other (picklable)."""

    socket_path: str
    counters_name: str  # shared block of _COUNTERS int64
    region_names: tuple[str, ...]  # one per front end
    region_bytes: int
    unit_bytes: int  # one frame at the model's input size

    @property
    def front_ends(self) -> int:
        return len(self.region_names)


def create_link(
    directory: Path, front_ends: int, region_bytes: int, unit_bytes: int
) -> InferenceLink:
    """Make the shared blocks (the supervisor does, before any process starts)."""
    counters = shared_memory.SharedMemory(create=True, size=8 * _COUNTERS)
    np.ndarray((_COUNTERS,), dtype=np.int64, buffer=counters.buf)[:] = 0
    units = max(1, region_bytes // unit_bytes)
    regions = [
        shared_memory.SharedMemory(create=True, size=units * unit_bytes) for _ in range(front_ends)
    ]
    link = InferenceLink(
        socket_path=str(directory / "inference.sock"),
        counters_name=counters.name,
        region_names=tuple(r.name for r in regions),
        region_bytes=units * unit_bytes,
        unit_bytes=unit_bytes,
    )
    counters.close()
    for region in regions:
        region.close()
    return link


def unlink_link(link: InferenceLink) -> None:
    """Remove the shared blocks (the supervisor, once every process has ended)."""
    for name in (link.counters_name, *link.region_names):
        with contextlib.suppress(FileNotFoundError):
            block = _attach(name)
            block.close()
            block.unlink()


def _attach(name: str) -> shared_memory.SharedMemory:
    # Only the supervisor owns (and unlinks) the blocks: the processes that attach must not
    # hand them to the resource tracker, which would unlink them when the first one exits.
    block = shared_memory.SharedMemory(name=name)
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        resource_tracker.unregister(block._name, "shared_memory")  # type: ignore[attr-defined]
    return block


def _record(kind: int, body: bytes) -> bytes:
    return _HEADER.pack(len(body) + 1, kind) + body


class _Records(asyncio.Protocol):
    """Splits the byte stream of a Unix socket into records; calls ``on_record``."""

    def __init__(self, on_record: Callable[[int, memoryview], None], on_lost: Callable[[], None]):
        self._on_record = on_record
        self._on_lost = on_lost
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        # Records sent in one event-loop iteration leave in one write: a system call and a
        # wake-up of the other process per iteration, not per record.
        self._outbox: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset = 0
        size = len(buffer)
        with memoryview(buffer) as view:
            while size - offset >= 5:
                length, kind = _HEADER.unpack_from(buffer, offset)
                end = offset + 4 + length
                if end > size:
                    break
                self._on_record(kind, view[offset + 5 : end])
                offset = end
        del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost()

    def send(self, record: bytes) -> None:
        if self.transport is None:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(record)

    def _flush(self) -> None:
        records, self._outbox = self._outbox, []
        if self.transport is not None:
            self.transport.write(b"".join(records))


# --------------------------------------------------------------------------- inference side


class _FrontEnd:
    """The inference process's view of one connected front end."""

    __slots__ = ("alive", "frames", "index", "pending", "records", "region")

    def __init__(self, index: int, region: shared_memory.SharedMemory, records: _Records):
        self.index = index
        self.region = region
        self.frames = np.ndarray((region.size,), dtype=np.uint8, buffer=region.buf)
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
        self._counters_block = _attach(link.counters_name)
        self._counters = np.ndarray((_COUNTERS,), dtype=np.int64, buffer=self._counters_block.buf)
        self._front_ends: dict[int, _FrontEnd] = {}
        self._server: asyncio.AbstractServer | None = None
        self._ready = b""

    async def start(self) -> None:
        """Start the batcher, warm the backend up, then listen for front ends."""
        await self.batcher.start()
        size = self._input_size
        # Warm-up through the batcher (the thread every later batch runs on), which also says
        # how wide a row of results is.
        warm = await self.batcher.submit(np.zeros((1, size, size, 3), dtype=np.uint8))
        self._classes = classes = int(warm[0].probabilities.shape[0])
        info = self._backend.info
        text = f"{info.name}\n{info.precision}\n{info.device}".encode()
        self._ready = _record(
            _READY, _READY_BODY.pack(self._settings.max_batch, classes, len(text)) + text
        )
        self._publish()
        self._counters[2] += 1
        path = Path(self._link.socket_path)
        await asyncio.to_thread(path.unlink, missing_ok=True)  # a dead predecessor's socket
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connection, str(path))

    def _connection(self) -> _Records:
        state: list[_FrontEnd] = []

        def on_record(kind: int, body: memoryview) -> None:
            if kind == _SUBMIT:
                self._submit(state[0], body)
            elif kind == _CANCEL:
                (request_id,) = _CANCEL_BODY.unpack(body)
                future = state[0].pending.get(request_id)
                if future is not None:
                    future.cancel()
            elif kind == _HELLO:
                (index,) = _HELLO_BODY.unpack(body)
                old = self._front_ends.get(index)
                if old is not None:
                    self._drop(old)  # its process was replaced
                region = _attach(self._link.region_names[index])
                front = _FrontEnd(index, region, records)
                self._front_ends[index] = front
                state.append(front)
                records.send(self._ready)

        def on_lost() -> None:
            if state and self._front_ends.get(state[0].index) is state[0]:
                del self._front_ends[state[0].index]
                self._drop(state[0])

        records = _Records(on_record, on_lost)
        return records

    def _drop(self, front: _FrontEnd) -> None:
        """A front end went away: withdraw what it has queued, answer it nothing more."""
        front.alive = False
        for future in list(front.pending.values()):
            future.cancel()
        front.pending.clear()

    def _submit(self, front: _FrontEnd, body: memoryview) -> None:
        request_id, offset, n, height, width, deadline = _SUBMIT_BODY.unpack_from(body)
        caller: Caller = bytes(body[_SUBMIT_BODY.size :]).decode() or None
        size = n * height * width * 3
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
        head = _RESULT_BODY.pack(
            request_id, first.queue_us, first.compute_us, first.batch_size, self._classes
        )
        # The rows travel on the socket (4 KB a frame): the frames' units stay untouched, so
        # a request whose answer is lost with this process can be sent again as it was.
        front.records.send(_record(_RESULT, head + b"".join(i.probabilities.data for i in items)))

    def _answer_error(self, front: _FrontEnd, request_id: int, exc: BaseException) -> None:
        kind = next((i for i, t in enumerate(_ERRORS) if isinstance(exc, t)), 0)
        front.records.send(_record(_ERROR, _ERROR_BODY.pack(request_id, kind) + str(exc).encode()))

    def _publish(self) -> None:
        counters = self._counters
        counters[0] = self.batcher.queued
        counters[1] = self.batcher.admitted_bytes

    async def close(self) -> None:
        """Stop listening, run what is queued, stop the batcher."""
        if self._server is not None:
            self._server.close()
        await self.batcher.close()
        for front in list(self._front_ends.values()):
            if front.records.transport is not None:
                front.records.transport.close()


# --------------------------------------------------------------------------- front-end side


class RemoteBackend:
    """What a front end knows of the backend that runs in the inference process: its info.

    It implements the Backend interface for the servicers (ModelInfo, metrics labels); it
    never runs a batch here.
    """

    def __init__(self, info: BackendInfo, max_batch: int) -> None:
        self._info = info
        self._max_batch = max_batch

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        raise BackendError("the backend runs in the inference process")

    def close(self) -> None:
        """Nothing is held here."""


class _Pending(asyncio.Future[list[ItemResult]]):
    """One request handed over: its future, and the units it holds until the answer."""

    __slots__ = ("caller", "n", "nbytes", "proxy", "request_id", "submit_record", "unit", "units")

    def __init__(self, proxy: InferenceProxy, request_id: int, unit: int, units: int, n: int,
                 nbytes: int, caller: Caller, loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        super().__init__(loop=loop)
        self.proxy = proxy
        self.request_id = request_id
        self.unit = unit
        self.units = units
        self.n = n
        self.nbytes = nbytes
        self.caller = caller
        self.submit_record = b""

    def cancel(self, msg: object = None) -> bool:
        if not super().cancel(msg):
            return False
        self.proxy._cancel(self)  # the inference process answers; the units are freed then
        return True


class InferenceProxy:
    """A front end's batcher: the same interface, the work done in the inference process."""

    def __init__(
        self,
        link: InferenceLink,
        index: int,
        settings: BatcherSettings,
        *,
        on_state: Callable[[bool], None] | None = None,
        retry_s: float = 0.05,
    ) -> None:
        self._link = link
        self._index = index
        self._settings = settings
        self._on_state = on_state
        self._retry_s = retry_s
        self._region = _attach(link.region_names[index])
        self._frames = np.ndarray((self._region.size,), dtype=np.uint8, buffer=self._region.buf)
        self._unit_bytes = link.unit_bytes
        self._free = bytearray(self._region.size // link.unit_bytes)  # 0: free unit
        self._counters_block = _attach(link.counters_name)
        self._counters = np.ndarray((_COUNTERS,), dtype=np.int64, buffer=self._counters_block.buf)
        self._records: _Records | None = None
        self._connected = asyncio.Event()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._callers: dict[Caller, int] = {}  # images in flight per caller (the reserves)
        self._queue_reserve = settings.max_queue // 4
        self._budget_reserve = settings.memory_budget_bytes // 4
        self._closing = False
        self._keeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.backend: RemoteBackend | None = None
        self._answered = 0
        self._failed = 0  # by the backend (or the inference process closing)
        self._expired = 0  # their deadline passed before compute
        self._cancelled = 0  # withdrawn by their caller (a cancelled call, a closed stream)
        self._rejected = 0

    # The Batcher interface the servicers use --------------------------------------------

    @property
    def settings(self) -> BatcherSettings:
        return self._settings

    @property
    def closed(self) -> bool:
        """True once closing; not while the inference process restarts (work waits then)."""
        return self._closing

    @property
    def queued(self) -> int:
        return int(self._counters[0])

    @property
    def admitted_bytes(self) -> int:
        return int(self._counters[1])

    @property
    def stats(self) -> BatcherStats:
        """The host's queue and budget as the inference process published them; this front
        end's own counts of images answered, failed and refused (batches are counted there)."""
        return BatcherStats(
            queued=self.queued,
            batches_run=0,
            images_run=self._answered,
            failed_batches=0,
            failed_images=self._failed,
            dropped_expired=self._expired,
            dropped_cancelled=self._cancelled,
            rejected_full=self._rejected,
            admitted_bytes=self.admitted_bytes,
            callers=len(self._callers),
        )

    async def start(self, timeout_s: float | None = None) -> None:
        """Connect to the inference process (waiting for it up to ``timeout_s``)."""
        self._loop = asyncio.get_running_loop()
        self._keeper = asyncio.ensure_future(self._keep_connected())
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            self._keeper.cancel()
            raise BatcherClosedError("the inference process did not answer") from None

    async def submit(
        self, images: NDArray[np.uint8], *, deadline: float | None = None, caller: Caller = None
    ) -> list[ItemResult]:
        return await self.submit_nowait(images, deadline=deadline, caller=caller)

    def submit_nowait(
        self, images: NDArray[np.uint8], *, deadline: float | None = None, caller: Caller = None
    ) -> asyncio.Future[list[ItemResult]]:
        """Admit ``images`` now (copied into shared memory), or raise as the Batcher does."""
        Batcher._validate_shape(images)
        n = int(images.shape[0])
        if not 1 <= n <= self._settings.max_batch:
            raise ValueError(f"a request holds 1 to {self._settings.max_batch} images, not {n}")
        if self._closing or self.backend is None:
            raise BatcherClosedError("the inference process is not reachable")
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExpiredError("the deadline had already passed on arrival")
        nbytes = images.nbytes
        refusal = self._refusal(caller, n, nbytes)
        units = max(1, math.ceil(nbytes / self._unit_bytes))
        unit = -1 if refusal else self._free.find(b"\0" * units)
        if refusal is None and unit < 0:
            refusal = "memory budget spent: this front end's shared region is full"
        if refusal is not None:
            self._rejected += n
            raise QueueFullError(refusal)
        self._free[unit : unit + units] = b"\1" * units
        offset = unit * self._unit_bytes
        self._frames[offset : offset + nbytes] = images.reshape(-1)
        self._next_id += 1
        request_id = self._next_id
        assert self._loop is not None
        pending = _Pending(self, request_id, unit, units, n, nbytes, caller, self._loop)
        self._pending[request_id] = pending
        self._callers[caller] = self._callers.get(caller, 0) + n
        _, height, width, _ = images.shape
        body = _SUBMIT_BODY.pack(request_id, offset, n, height, width, deadline or 0.0)
        pending.submit_record = _record(_SUBMIT, body + (str(caller) if caller else "").encode())
        # While the inference process restarts, requests wait here (their frames are in the
        # region) and go when it is back: a lossless stream does not lose them.
        if self._records is not None and self._connected.is_set():
            self._records.send(pending.submit_record)
        return pending

    def has_room(self, images: NDArray[np.uint8], *, caller: Caller = None) -> bool:
        units = max(1, math.ceil(images.nbytes / self._unit_bytes))
        return (
            self._refusal(caller, images.shape[0], images.nbytes) is None
            and self._free.find(b"\0" * units) >= 0
        )

    async def wait_for_room(self, images: NDArray[np.uint8], *, caller: Caller = None) -> None:
        """Wait until ``images`` fit; the room is the host's, so this looks again every ms."""
        # Room is freed by any front end's work, in another process: no event here to await.
        while not self._closing and not self.has_room(images, caller=caller):  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        if self._closing:
            raise BatcherClosedError("the batcher is closed")

    async def close(self) -> None:
        """Refuse new work, wait for what is in flight to be answered, then disconnect."""
        self._closing = True
        while any(not p.done() for p in self._pending.values()):  # noqa: ASYNC110 (at stop)
            await asyncio.sleep(0.005)
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._records is not None and self._records.transport is not None:
            self._records.transport.close()

    # Internals ----------------------------------------------------------------------------

    def _refusal(self, caller: Caller, n: int, nbytes: int) -> str | None:
        """The Batcher's own rule, against the host's published queue and budget."""
        settings = self._settings
        modest = self._callers.get(caller, 0) + n <= settings.max_batch
        queued = int(self._counters[0])
        if queued + n > settings.max_queue - (0 if modest else self._queue_reserve):
            return f"queue full: {queued} of {settings.max_queue} images waiting, no room for {n}"
        admitted = int(self._counters[1])
        budget = settings.memory_budget_bytes
        if admitted + nbytes > budget - (0 if modest else self._budget_reserve):
            mib = 1024 * 1024
            return (
                f"memory budget spent: {admitted / mib:.1f} of {budget / mib:.1f} MiB of images "
                f"admitted, no room for {nbytes / mib:.2f} MiB more"
            )
        return None

    def _cancel(self, pending: _Pending) -> None:
        if pending.request_id not in self._pending:
            return
        if self._records is not None and self._connected.is_set():
            self._records.send(_record(_CANCEL, _CANCEL_BODY.pack(pending.request_id)))
        # else: never sent to the process now running; _resend frees it

    def _release(self, pending: _Pending) -> None:
        self._free[pending.unit : pending.unit + pending.units] = b"\0" * pending.units
        left = self._callers.get(pending.caller, 0) - pending.n
        if left > 0:
            self._callers[pending.caller] = left
        else:
            self._callers.pop(pending.caller, None)

    def _on_record(self, kind: int, body: memoryview) -> None:
        if kind == _RESULT:
            request_id, queue_us, compute_us, batch_size, classes = _RESULT_BODY.unpack_from(body)
            pending = self._pending.pop(request_id, None)
            if pending is None:
                return
            n = pending.n
            rows = np.frombuffer(body, dtype=np.float32, offset=_RESULT_BODY.size)
            probabilities = rows.reshape(n, classes).copy()  # the body is the read buffer's
            probabilities.flags.writeable = False
            self._release(pending)
            self._answered += n
            if not pending.done():
                pending.set_result(
                    [
                        ItemResult(probabilities[i], queue_us, compute_us, batch_size)
                        for i in range(n)
                    ]
                )
        elif kind == _ERROR:
            request_id, error_kind = _ERROR_BODY.unpack_from(body)
            pending = self._pending.pop(request_id, None)
            if pending is None:
                return
            self._release(pending)
            error = _ERRORS[error_kind]
            # Counted by reason, as the Batcher counts them (the metrics' failure reasons).
            if pending.cancelled():
                self._cancelled += pending.n
            elif error is DeadlineExpiredError:
                self._expired += pending.n
            else:
                self._failed += pending.n
            if not pending.done():
                message = bytes(body[_ERROR_BODY.size :]).decode(errors="replace")
                pending.set_exception(error(message))
        elif kind == _READY:
            max_batch, _classes, length = _READY_BODY.unpack_from(body)
            start = _READY_BODY.size
            name, precision, device = bytes(body[start : start + length]).decode().split("\n")
            self.backend = RemoteBackend(BackendInfo(name, precision, device), max_batch)
            self._resend()
            self._connected.set()
            if self._on_state is not None:
                self._on_state(True)

    def _on_lost(self) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._records = None
        # The inference process is gone, and with it what it had queued. The requests in
        # flight keep their frames here: they are sent again to the restarted process (their
        # deadlines still hold), so a lossless stream loses nothing to the restart.
        if was and self._on_state is not None:
            self._on_state(False)

    def _resend(self) -> None:
        """Connected (again): hand over what was in flight when the last process went."""
        assert self._records is not None
        for request_id in sorted(self._pending):  # in order: a caller's FIFO holds
            request = self._pending[request_id]
            if request.done():  # cancelled meanwhile: nothing to send, free it
                del self._pending[request_id]
                self._release(request)
                continue
            self._records.send(request.submit_record)

    async def _keep_connected(self) -> None:
        loop = asyncio.get_running_loop()
        lost = asyncio.Event()
        while not self._closing:
            lost.clear()

            def on_lost() -> None:
                self._on_lost()
                lost.set()

            try:
                _, records = await loop.create_unix_connection(
                    lambda: _Records(self._on_record, on_lost),
                    self._link.socket_path,
                )
            except OSError:
                await asyncio.sleep(self._retry_s)
                continue
            self._records = records
            records.send(_record(_HELLO, _HELLO_BODY.pack(self._index)))
            await lost.wait()
            if not self._closing:
                logger.error("the inference process went away; reconnecting")
