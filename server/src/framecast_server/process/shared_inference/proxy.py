"""The front end's side of the hand-off: a batcher whose work is done in the inference process.

:class:`InferenceProxy` has the :class:`Batcher` interface the servicers use (``submit``,
``submit_nowait``, ``wait_for_room``, the limits and stats); a request's frames are copied
once into this front end's shared region and a small record hands them over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from ...backends.base import BackendError, BackendInfo
from ...core.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherSettings,
    BatcherStats,
    Caller,
    DeadlineExpiredError,
    ItemResult,
    QueueFullError,
)
from .link import (
    ADMITTED,
    CANCEL,
    CANCEL_BODY,
    ERROR,
    ERROR_BODY,
    ERRORS,
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

    __slots__ = ("caller", "n", "proxy", "request_id", "submit_record", "unit", "units")

    def __init__(self, proxy: InferenceProxy, request_id: int, unit: int, units: int, n: int,
                 caller: Caller, loop: asyncio.AbstractEventLoop) -> None:  # fmt: skip
        super().__init__(loop=loop)
        self.proxy = proxy
        self.request_id = request_id
        self.unit = unit
        self.units = units
        self.n = n
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
        region = attach(link.region_names[index])
        # The view before the region (see Counters): released first, whichever way it goes.
        self._frames = np.ndarray((region.size,), dtype=np.uint8, buffer=region.buf)
        self._region = region
        self._unit_bytes = link.unit_bytes
        self._free = bytearray(region.size // link.unit_bytes)  # 0: free unit
        # Read through the Counters object, never kept apart: its view goes before its block.
        self._counters = Counters(link.counters_name)
        self._records: Records | None = None
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
        return self._counters.values[QUEUED]

    @property
    def admitted_bytes(self) -> int:
        return self._counters.values[ADMITTED]

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

    @property
    def model_stats(self) -> BatcherStats:
        """The model's statistics host-wide: the inference process's batches, images and
        times and failed batches as it published them (every front end's work); refusals and
        drops as this front end counted them (they happen here, before the hand-off)."""
        values = self._counters.values
        run = {name: values[i] for i, name in enumerate(RUN_STATS, STATS_AT)}
        own = self.stats
        return BatcherStats(
            queued=own.queued,
            dropped_expired=own.dropped_expired,
            dropped_cancelled=own.dropped_cancelled,
            rejected_full=own.rejected_full,
            admitted_bytes=own.admitted_bytes,
            callers=own.callers,
            **run,
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
        unit = -1 if refusal else self._free.find(_FREE[units] if units < 64 else bytes(units))
        if refusal is None and unit < 0:
            refusal = "memory budget spent: this front end's shared region is full"
        if refusal is not None:
            self._rejected += n
            raise QueueFullError(refusal)
        self._free[unit : unit + units] = _TAKEN[units] if units < 64 else b"\1" * units
        offset = unit * self._unit_bytes
        self._frames[offset : offset + nbytes] = images.reshape(-1)
        self._next_id += 1
        request_id = self._next_id
        assert self._loop is not None
        pending = _Pending(self, request_id, unit, units, n, caller, self._loop)
        self._pending[request_id] = pending
        self._callers[caller] = self._callers.get(caller, 0) + n
        _, height, width, _ = images.shape
        body = SUBMIT_BODY.pack(request_id, offset, n, height, width, deadline or 0.0)
        pending.submit_record = record(SUBMIT, body + (str(caller) if caller else "").encode())
        # While the inference process restarts, requests wait here (their frames are in the
        # region) and go when it is back: a lossless stream does not lose them.
        if self._records is not None and self._connected.is_set():
            self._records.send(pending.submit_record)
        return pending

    def has_room(self, images: NDArray[np.uint8], *, caller: Caller = None) -> bool:
        units = max(1, math.ceil(images.nbytes / self._unit_bytes))
        return (
            self._refusal(caller, images.shape[0], images.nbytes) is None
            and self._free.find(bytes(units)) >= 0
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
        self._pending.clear()
        del self._frames
        close_region(self._region)

    # Internals ----------------------------------------------------------------------------

    def _refusal(self, caller: Caller, n: int, nbytes: int) -> str | None:
        """The Batcher's own rule, against the host's published queue and budget."""
        settings = self._settings
        modest = self._callers.get(caller, 0) + n <= settings.max_batch
        queued = self._counters.values[QUEUED]
        if queued + n > settings.max_queue - (0 if modest else self._queue_reserve):
            return f"queue full: {queued} of {settings.max_queue} images waiting, no room for {n}"
        admitted = self._counters.values[ADMITTED]
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
            self._records.send(record(CANCEL, CANCEL_BODY.pack(pending.request_id)))
        # else: never sent to the process now running; _resend frees it

    def _release(self, pending: _Pending) -> None:
        self._free[pending.unit : pending.unit + pending.units] = bytes(pending.units)
        left = self._callers.get(pending.caller, 0) - pending.n
        if left > 0:
            self._callers[pending.caller] = left
        else:
            self._callers.pop(pending.caller, None)

    def _on_record(self, kind: int, body: memoryview) -> None:
        if kind == RESULT:
            request_id, queue_us, compute_us, batch_size, classes = RESULT_BODY.unpack_from(body)
            pending = self._pending.pop(request_id, None)
            if pending is None:
                return
            n = pending.n
            rows = np.frombuffer(body, dtype=np.float32, offset=RESULT_BODY.size)
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
        elif kind == ERROR:
            request_id, error_kind = ERROR_BODY.unpack_from(body)
            pending = self._pending.pop(request_id, None)
            if pending is None:
                return
            self._release(pending)
            error = ERRORS[error_kind]
            # Counted by reason, as the Batcher counts them (the metrics' failure reasons).
            if pending.cancelled():
                self._cancelled += pending.n
            elif error is DeadlineExpiredError:
                self._expired += pending.n
            else:
                self._failed += pending.n
            if not pending.done():
                message = bytes(body[ERROR_BODY.size :]).decode(errors="replace")
                pending.set_exception(error(message))
        elif kind == READY:
            max_batch, _classes, length = READY_BODY.unpack_from(body)
            start = READY_BODY.size
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
                    lambda: Records(self._on_record, on_lost),
                    self._link.socket_path,
                )
            except OSError:
                await asyncio.sleep(self._retry_s)
                continue
            self._records = records
            records.send(record(HELLO, HELLO_BODY.pack(self._index)))
            await lost.wait()
            if not self._closing:
                logger.error("the inference process went away; reconnecting")


# Search and mark patterns of the usual unit counts, made once.
_FREE = [bytes(units) for units in range(64)]
_TAKEN = [b"\1" * units for units in range(64)]
