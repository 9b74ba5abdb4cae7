"""The shared blocks of the hand-off and the records on its sockets.

The supervisor makes the blocks before any process starts (:func:`create_link`) and removes
them once every process has ended (:func:`unlink_link`); the front ends and the inference
process attach to them by name (:func:`attach`). The records are small fixed structs: no
pickling; a :class:`Records` protocol splits a socket's bytes into them and sends those of one
event-loop iteration in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import cast

from ...backends.base import BackendError
from ...core.batcher import (
    BatcherClosedError,
    DeadlineExpiredError,
    QueueFullError,
)
from .blocks import block_name, sweep_stale_blocks

# Record kinds. Every record: u32 length of what follows, u8 kind, payload.
HELLO, SUBMIT, CANCEL = 1, 2, 3
READY, RESULT, ERROR = 11, 12, 13
HEADER = struct.Struct("<IB")
HELLO_BODY = struct.Struct("<I")  # front-end index
READY_BODY = struct.Struct("<III")  # max batch, classes, length of the info text that follows
SUBMIT_BODY = struct.Struct("<QQIIId")  # id, offset, n, height, width, deadline (0: none)
CANCEL_BODY = struct.Struct("<Q")
RESULT_BODY = struct.Struct("<QQQII")  # id, queue_us, compute_us, batch size, classes
ERROR_BODY = struct.Struct("<QB")  # id, error kind; then the message
ERRORS: tuple[type[Exception], ...] = (
    BackendError,
    DeadlineExpiredError,
    BatcherClosedError,
    QueueFullError,
    ValueError,
)
# The published counters of the inference process: images queued, bytes admitted, generation
# (bumped at every start, so a front end sees a restart), then its batcher's statistics (the
# model's, host-wide: what the Open Inference Protocol's ModelStatistics reports).
COUNTERS = 10
QUEUED, ADMITTED, GENERATION = range(3)
RUN_STATS = ("batches_run", "images_run", "failed_batches", "failed_images", "queue_ns",
             "compute_ns", "last_run_unix_ns")  # fmt: skip
STATS_AT = 3  # where they start in the block


@dataclass(frozen=True, slots=True)
class InferenceLink:
    """What a front end and the inference process need to find each other (picklable)."""

    socket_path: str
    counters_name: str  # shared block of COUNTERS int64
    region_names: tuple[str, ...]  # one per front end
    region_bytes: int
    unit_bytes: int  # one frame at the model's input size

    @property
    def front_ends(self) -> int:
        return len(self.region_names)


def create_link(
    directory: Path, front_ends: int, region_bytes: int, unit_bytes: int
) -> InferenceLink:
    """Make the shared blocks (the supervisor does, before any process starts).

    First removes the blocks a killed run left (blocks.py), then names its own after itself.
    """
    sweep_stale_blocks()
    counters = shared_memory.SharedMemory(name=block_name(), create=True, size=8 * COUNTERS)
    buffer(counters)[:] = bytes(8 * COUNTERS)
    units = max(1, region_bytes // unit_bytes)
    regions = [
        shared_memory.SharedMemory(name=block_name(), create=True, size=units * unit_bytes)
        for _ in range(front_ends)
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
            # Not attach(): this process created the blocks, so its resource tracker holds
            # them, and unlink() takes them back from it. attach() would take them first, and
            # the tracker would then print a KeyError traceback for each at shutdown.
            block = shared_memory.SharedMemory(name=name)
            block.close()
            block.unlink()


class _Attached(shared_memory.SharedMemory):
    """A block attached by name, whose views may outlive it."""

    def __del__(self) -> None:
        # When a reference cycle holding a block and a view of it is collected, the block's
        # finalizer can run first, and close() then refuses (the view still exports the
        # memory). The mapping goes with the last view instead: nothing to do here then.
        with contextlib.suppress(BufferError):
            self.close()


def attach(name: str) -> shared_memory.SharedMemory:
    """Attach to a shared block by name, leaving its ownership to the supervisor."""
    # Only the supervisor owns (and unlinks) the blocks: the processes that attach must not
    # hand them to the resource tracker, which would unlink them when the first one exits.
    block = _Attached(name=name)
    with contextlib.suppress(Exception):
        from multiprocessing import resource_tracker

        resource_tracker.unregister(block._name, "shared_memory")  # type: ignore[attr-defined]
    return block


def buffer(block: shared_memory.SharedMemory) -> memoryview:
    """The block's memory (None only once closed)."""
    view = block.buf
    if view is None:
        raise ValueError(f"the shared block {block.name} is closed")
    return view


class Counters:
    """The inference process's published queue, admitted bytes and generation.

    A memoryview of int64 over the shared block: a scalar read or write is one index (numpy's
    scalar access costs several times more, and both sides touch these on every request).
    """

    def __init__(self, name: str) -> None:
        block = attach(name)
        # The view before the block: whichever way this object goes, the view is released
        # first, and the block can then unmap (it cannot while a view of it exists).
        self.values = buffer(block).cast("q")
        self._block = block

    def close(self) -> None:
        self.values.release()
        self._block.close()


def close_region(block: shared_memory.SharedMemory) -> None:
    """Unmap a region once no array views it any more; if one still does, leave it mapped
    (the process is ending) rather than fail."""
    with contextlib.suppress(BufferError):
        block.close()


def record(kind: int, body: bytes) -> bytes:
    """One record: header and body."""
    return HEADER.pack(len(body) + 1, kind) + body


class Records(asyncio.Protocol):
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
        if buffer:
            buffer += data
            source: bytes | bytearray = buffer
        else:
            source = data  # the common case, whole records: parsed without a copy
        offset = 0
        size = len(source)
        unpack = HEADER.unpack_from
        on_record = self._on_record
        with memoryview(source) as view:
            while size - offset >= 5:
                length, kind = unpack(source, offset)
                end = offset + 4 + length
                if end > size:
                    break
                on_record(kind, view[offset + 5 : end])
                offset = end
        if source is buffer:
            del buffer[:offset]
        elif offset < size:
            buffer += data[offset:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._on_lost()

    def send(self, message: bytes) -> None:
        """Queue a record (or several, joined) for this iteration's one write."""
        if self.transport is None:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        records, self._outbox = self._outbox, []
        if self.transport is not None:
            self.transport.write(b"".join(records) if len(records) > 1 else records[0])
