"""ListStreams for the whole host: every worker's streams under ``serve --workers N``.

Each worker process has its own :class:`StreamRegistry`, and a connection reaches one worker
(SO_REUSEPORT), so one worker alone knows a share of the host's streams. The supervisor makes
a directory for the run and hands it to every worker (the front ends, under ``--inference
shared``); each worker writes its listing there every :data:`PUBLISH_INTERVAL_S` as
``<index>-<pid>.pb`` (a serialized ListStreamsResponse, bounded like any listing), through a
temporary file and a rename so that a reader never sees half of one, and removes it when it
stops. ListStreams answers the worker's own streams, live, and the other workers' latest
snapshots (at most a second or so old), oldest first, at most :data:`LIST_LIMIT` with
``omitted`` counting the rest. A snapshot whose process is gone (a killed worker cannot remove
its file) or that was not refreshed within :data:`STALE_S` is ignored.

Stream ids: every registry counts from 1, so a listing gives a worker's streams as
``index << 40 | start << 32 | id``, where ``start`` counts the starts of that worker in this
run (a restarted worker claims the next, mod 256, with a marker file in the directory): ids
are unique across the host's workers and across a worker's restarts, so a stream listed
after a crash is never taken for one listed before it. The first worker 0's ids, like a single
server's, are the registry's own. A single server has no directory and lists its registry
alone, as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from framecast_client._proto import classifier_pb2 as pb

from .stream_registry import LIST_LIMIT, NAME_LIMIT, StreamRegistry

__all__ = [
    "PUBLISH_INTERVAL_S",
    "STALE_S",
    "STARTS",
    "START_SHIFT",
    "WORKER_SHIFT",
    "StreamBoard",
    "claim_start",
    "describe",
    "merge",
    "read_snapshots",
]

logger = logging.getLogger(__name__)

# A listed id is index << WORKER_SHIFT | start << START_SHIFT | the registry's id (a registry
# never counts to 2**32 streams).
WORKER_SHIFT = 40
START_SHIFT = 32
STARTS = 1 << (WORKER_SHIFT - START_SHIFT)
PUBLISH_INTERVAL_S = 1.0
# A snapshot not refreshed for this long is a worker that stopped publishing (stuck or gone).
STALE_S = 5.0
_SUFFIX = ".pb"
# LIST_LIMIT streams of bounded fields take some 200 KB; anything far bigger is not a snapshot.
_MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024
_UINT32_MAX = 2**32 - 1
_CLAIM = os.O_CREAT | os.O_EXCL | os.O_WRONLY


def describe(registry: StreamRegistry, base: int = 0) -> pb.ListStreamsResponse:
    """One process's listing: its oldest LIST_LIMIT streams, ``base`` or'ed into their ids."""
    streams, omitted = registry.listing()
    response = pb.ListStreamsResponse(omitted=omitted)
    for entry in streams:
        rate_in, rate_out = entry.rates()
        response.streams.add(
            id=base | entry.id,
            caller=entry.caller,
            name=entry.name,
            started_unix_ms=entry.started_unix_ms,
            frames_in_per_s=rate_in,
            frames_out_per_s=rate_out,
            p99_latency_ms=entry.p99_latency_ms(),
            p99_age_ms=entry.p99_age_ms(),
            frames_in=entry.frames_in,
            frames_out=entry.frames_out,
            dropped=entry.dropped,
            max_age_ms=entry.max_age_ms,
            rate_hint_fps=entry.rate_hint_fps,
        )
    return response


def merge(
    own: pb.ListStreamsResponse, others: Iterable[pb.ListStreamsResponse]
) -> pb.ListStreamsResponse:
    """``own`` and the other workers' listings in one: oldest first, capped at LIST_LIMIT.

    ``omitted`` counts every stream left out, here or already by a worker. Fields from files
    are cut to NAME_LIMIT again: the listing stays bounded whatever a snapshot holds.
    """
    streams = list(own.streams)
    omitted = own.omitted
    for listing in others:
        omitted += listing.omitted + max(0, len(listing.streams) - LIST_LIMIT)
        for info in listing.streams[:LIST_LIMIT]:
            if len(info.caller) > NAME_LIMIT:
                info.caller = info.caller[:NAME_LIMIT]
            if len(info.name) > NAME_LIMIT:
                info.name = info.name[:NAME_LIMIT]
            streams.append(info)
    streams.sort(key=lambda s: (s.started_unix_ms, s.id))
    omitted += max(0, len(streams) - LIST_LIMIT)
    response = pb.ListStreamsResponse(omitted=min(omitted, _UINT32_MAX))
    response.streams.extend(streams[:LIST_LIMIT])
    return response


def _name(worker: int, pid: int) -> str:
    return f"{worker}-{pid}{_SUFFIX}"


def _parse_name(name: str) -> tuple[int, int] | None:
    """(worker, pid) of a snapshot's file name; None for anything else (temporary files)."""
    if not name.endswith(_SUFFIX):
        return None
    worker, _, pid = name.removesuffix(_SUFFIX).partition("-")
    if not (worker.isdigit() and pid.isdigit()):
        return None
    return int(worker), int(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours, but not gone either
    return True


def read_snapshots(
    directory: Path, worker: int, now: float | None = None
) -> list[pb.ListStreamsResponse]:
    """The latest listing of every worker but ``worker``, leaving out stale ones.

    Stale: the file's process is gone (its file is removed then), or the file was last written
    more than STALE_S before ``now`` (Unix seconds; default: the time now). Of two fresh files
    of one worker index (a restarted worker beside the last one's), the newer counts.
    """
    now = time.time() if now is None else now
    newest: dict[int, tuple[float, Path]] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []  # the supervisor has removed the directory: it is stopping
    for entry in entries:
        parsed = _parse_name(entry.name)
        if parsed is None or parsed[0] == worker:
            continue
        index, pid = parsed
        if pid == os.getpid():
            continue
        if not _alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)  # a killed worker's: nobody else removes it
            continue
        try:
            stat = entry.stat()
        except OSError:
            continue  # replaced or removed meanwhile
        if now - stat.st_mtime > STALE_S or stat.st_size > _MAX_SNAPSHOT_BYTES:
            continue
        if index not in newest or stat.st_mtime > newest[index][0]:
            newest[index] = (stat.st_mtime, Path(entry.path))
    listings = []
    for _, path in newest.values():
        try:
            listings.append(pb.ListStreamsResponse.FromString(path.read_bytes()))
        except Exception:  # gone meanwhile, or not a listing: skip it, list the others
            logger.debug("skipped the stream snapshot %s", path, exc_info=True)
    return listings


def claim_start(directory: Path, worker: int) -> int:
    """Which start of worker ``worker`` this is in the run (0 for the first), mod STARTS.

    Claimed with a marker file created exclusively, so no two starts of a worker share one;
    after STARTS restarts the count begins again.
    """
    for attempt in range(2):
        for start in range(STARTS):
            try:
                os.close(os.open(directory / f"{worker}.start{start}", _CLAIM, 0o600))
            except FileExistsError:
                continue
            return start
        if attempt == 0:
            for start in range(STARTS):
                with contextlib.suppress(OSError):
                    os.unlink(directory / f"{worker}.start{start}")
    raise FileExistsError(f"cannot claim a start of worker {worker} in {directory}")


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    temporary.replace(path)  # readers see the last snapshot or this one, never half of one


class StreamBoard:
    """What ListStreams answers: this process's streams, or, once joined, every worker's.

    Runs on the server's event loop, like the registry it reads; files are read and written on
    threads.
    """

    def __init__(self, registry: StreamRegistry) -> None:
        self._registry = registry
        self._directory: Path | None = None
        self._worker = 0
        self._base = 0  # or'ed into this process's stream ids
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def join(self, directory: Path, worker: int) -> None:
        """Be worker ``worker`` of a host whose workers publish their streams to ``directory``."""
        if not 0 <= worker < 1 << (63 - WORKER_SHIFT):
            raise ValueError(f"worker index out of range: {worker}")
        try:
            start = claim_start(directory, worker)
        except OSError as exc:
            # Serving matters more than the listing: ids may then repeat across restarts.
            logger.warning("cannot count this worker's starts in %s: %s", directory, exc)
            start = 0
        self._directory, self._worker = directory, worker
        self._base = worker << WORKER_SHIFT | start << START_SHIFT

    @property
    def path(self) -> Path | None:
        """This process's snapshot, once joined."""
        if self._directory is None:
            return None
        return self._directory / _name(self._worker, os.getpid())

    async def listing(self) -> pb.ListStreamsResponse:
        """The host's streams (this process's alone when not joined)."""
        own = describe(self._registry, self._base)
        if self._directory is None:
            return own
        others = await asyncio.to_thread(read_snapshots, self._directory, self._worker)
        return merge(own, others)

    def start(self) -> None:
        """Publish this process's streams every PUBLISH_INTERVAL_S (once joined)."""
        if self._directory is not None and self._task is None:
            self._task = asyncio.ensure_future(self._publish())

    async def close(self) -> None:
        """Stop publishing and remove this process's snapshot."""
        if self._task is None:
            return
        self._stop.set()
        # Not cancelled: a write in flight on its thread would bring the file back.
        await self._task
        self._task = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _publish(self) -> None:
        path = self.path
        assert path is not None
        failing = False
        while not self._stop.is_set():
            data = describe(self._registry, self._base).SerializeToString()
            try:
                await asyncio.to_thread(_write, path, data)
                failing = False
            except OSError as exc:
                if not failing:  # once per run of failures, not every second
                    logger.warning("cannot publish this worker's streams to %s: %s", path, exc)
                failing = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), PUBLISH_INTERVAL_S)
