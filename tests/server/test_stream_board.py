"""ListStreams under ``serve --workers N`` lists every worker's streams (service/stream_board.py).

The snapshots are real files in a real directory, their writers real processes (alive,
finished, or this one); the end-to-end test runs ``framecast serve --workers 2`` and the
``framecast top`` command, with streams over their own connections on both workers, and
kills a worker with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from framecast_client import Client, FramecastError, StreamSession, UnavailableError
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.sources import SyntheticCamera
from framecast_client.types import StreamView
from framecast_server.service.stream_board import (
    STALE_S,
    START_SHIFT,
    STARTS,
    WORKER_SHIFT,
    StreamBoard,
    claim_start,
    describe,
    merge,
    read_snapshots,
)
from framecast_server.service.stream_registry import LIST_LIMIT, NAME_LIMIT, StreamRegistry
from support import Host, serve_workers, wait_until

FRAMECAST = str(Path(sys.executable).with_name("framecast"))
TIMEOUT_S = 60.0


def registry_with(*names: str) -> StreamRegistry:
    registry = StreamRegistry()
    for name in names:
        registry.open("caller", name, 0)
    return registry


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A process that runs until the test ends: a worker that is alive."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def snapshot(directory: Path, worker: int, pid: int, *names: str, base: int = 0) -> Path:
    path = directory / f"{worker}-{pid}.pb"
    path.write_bytes(describe(registry_with(*names), base).SerializeToString())
    return path


def names(listing: pb.ListStreamsResponse) -> list[str]:
    return [s.name for s in listing.streams]


def test_a_single_server_lists_its_own_streams_with_its_own_ids() -> None:
    registry = registry_with("a", "b")
    listing = asyncio.run(StreamBoard(registry).listing())
    assert [(s.id, s.name) for s in listing.streams] == [(1, "a"), (2, "b")]
    assert listing.omitted == 0


def test_fresh_snapshots_of_live_workers_count_and_stale_ones_do_not(
    tmp_path: Path, live_pid: int
) -> None:
    fresh = snapshot(tmp_path, 1, live_pid, "on-1", base=1 << WORKER_SHIFT)
    stuck = snapshot(tmp_path, 2, live_pid, "stuck", base=2 << WORKER_SHIFT)
    old = time.time() - STALE_S - 1
    os.utime(stuck, (old, old))  # alive, but not refreshed: stuck
    killed = snapshot(tmp_path, 3, dead_pid(), "killed", base=3 << WORKER_SHIFT)
    (tmp_path / f"4-{live_pid}.pb").write_bytes(b"\xff\xff not a listing")
    (tmp_path / f"5-{live_pid}.pb.tmp").write_bytes(fresh.read_bytes())  # half-written
    (tmp_path / f"0-{live_pid}.pb").write_bytes(fresh.read_bytes())  # the reader's own index

    (listing,) = read_snapshots(tmp_path, worker=0)
    assert names(listing) == ["on-1"]
    assert listing.streams[0].id == 1 << WORKER_SHIFT | 1
    assert not killed.exists()  # a killed worker cannot remove its file; a reader does
    assert stuck.exists()  # its process may yet come back to it
    # Of two files of one worker (a restarted one beside its predecessor), the newer counts.
    later = snapshot(tmp_path, 1, os.getppid(), "on-1-again", base=1 << WORKER_SHIFT)
    os.utime(later, (time.time() + 1, time.time() + 1))
    assert [names(x) for x in read_snapshots(tmp_path, worker=0)] == [["on-1-again"]]
    assert read_snapshots(tmp_path / "gone", worker=0) == []  # the supervisor cleaned up


def test_the_merged_listing_is_oldest_first_capped_and_bounded() -> None:
    own = describe(registry_with(*(f"own-{i}" for i in range(600))))
    other = describe(registry_with(*(f"other-{i}" for i in range(600))), 1 << WORKER_SHIFT)
    other.omitted = 7  # streams the other worker already left out
    for info in own.streams:
        info.started_unix_ms = 2_000
    for info in other.streams:
        info.started_unix_ms = 1_000  # the other worker's streams started first
    other.streams[0].name = "n" * 500  # a snapshot is read from a file: bound it again
    merged = merge(own, [other])
    assert len(merged.streams) == LIST_LIMIT
    assert merged.omitted == 7 + 1200 - LIST_LIMIT
    assert names(merged)[:2] == ["n" * NAME_LIMIT, "other-1"]
    assert names(merged)[600] == "own-0"
    assert len({s.id for s in merged.streams}) == LIST_LIMIT


def test_each_start_of_a_worker_claims_the_next_start(tmp_path: Path) -> None:
    assert [claim_start(tmp_path, 1) for _ in range(3)] == [0, 1, 2]
    assert claim_start(tmp_path, 0) == 0
    for _ in range(STARTS - 3):
        claim_start(tmp_path, 1)
    assert claim_start(tmp_path, 1) == 0  # counted again after STARTS restarts


def test_a_worker_publishes_its_streams_and_removes_them_when_it_stops(tmp_path: Path) -> None:
    async def run() -> None:
        registry = registry_with("dock-3")
        board = StreamBoard(registry)
        claim_start(tmp_path, 2)  # worker 2 ran before: this is its second start
        board.join(tmp_path, 2)
        board.start()
        path = board.path
        assert path is not None
        deadline = time.monotonic() + TIMEOUT_S
        while not path.exists():
            assert time.monotonic() < deadline, "no snapshot was published"
            await asyncio.sleep(0.01)
        published = pb.ListStreamsResponse.FromString(path.read_bytes())
        assert [(s.id, s.name) for s in published.streams] == [
            (2 << WORKER_SHIFT | 1 << START_SHIFT | 1, "dock-3")
        ]
        # Its own listing is live (not its file) and tagged the same way.
        registry.open("caller", "yard-1", 0)
        listing = await board.listing()
        assert [s.name for s in listing.streams] == ["dock-3", "yard-1"]
        await board.close()
        assert not path.exists()

    asyncio.run(run())


# ---- end to end: `framecast serve --workers 2` and `framecast top` ----


def top_json(address: str) -> dict[str, object]:
    done = subprocess.run(
        [FRAMECAST, "top", address, "--json", "--once"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not done.stderr
    listing: dict[str, object] = json.loads(done.stdout)
    return listing


def listed(address: str) -> list[StreamView]:
    """The listing, asked over a new connection (whichever worker it reaches)."""
    with Client(address, timeout=30) as client:
        return client.list_streams()


def listed_after_kill(address: str) -> list[StreamView]:
    """The listing, or none while a new connection still reaches the killed worker's socket
    (the kernel resets a connection queued on it when it dies: a client tries again)."""
    try:
        return listed(address)
    except UnavailableError:
        return []


def listed_as(address: str, name: str) -> StreamView:
    """The stream named ``name``, once it is listed (another worker sees it a second later)."""
    found: list[StreamView] = []

    def find() -> bool:
        found[:] = [s for s in listed(address) if s.name == name]
        return bool(found)

    wait_until(find, f"{name} listed", timeout_s=TIMEOUT_S, interval_s=0.2)
    return found[0]


def worker_of(stream_id: int) -> int:
    return stream_id >> WORKER_SHIFT


class Cameras:
    """Named realtime streams, each on a connection of its own (so on either worker)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._clients: list[Client] = []
        self.sessions: dict[str, StreamSession] = {}

    def open(self, name: str) -> None:
        client = Client(self.address, timeout=30)
        self._clients.append(client)
        # No reconnecting: a killed worker's streams end rather than come back elsewhere.
        session = client.stream(SyntheticCamera(48, 48, fps=5), name=name, reconnect=False)
        self.sessions[name] = session

        def consume() -> None:
            with contextlib.suppress(FramecastError):  # its worker was killed
                for _ in session:
                    pass

        threading.Thread(target=consume, daemon=True).start()

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        for client in self._clients:
            client.close()


def serving_pids(host: Host) -> dict[int, int]:
    """The pid of each worker index, as the supervisor logged them serving (the latest)."""
    found = re.findall(r"worker (\d+) serving \(pid (\d+)\)", host.log.read_text())
    return {int(index): int(pid) for index, pid in found}


def spread(cameras: Cameras) -> dict[str, StreamView]:
    """Open streams until both workers hold some (a connection lands on either); the listing."""
    by_name: dict[str, StreamView] = {}
    while len({worker_of(s.id) for s in by_name.values()}) < 2:
        assert len(cameras.sessions) < 40, f"every stream on one worker: {by_name}"
        for _ in range(4):
            cameras.open(f"cam-{len(cameras.sessions)}")
        wait_until(
            lambda: {s.name for s in listed(cameras.address)} == set(cameras.sessions),
            "every stream listed",
            timeout_s=TIMEOUT_S,
            seen=lambda: [s.name for s in listed(cameras.address)],
            interval_s=0.2,
        )
        by_name = {s.name: s for s in listed(cameras.address)}
    return by_name


def assert_top_lists(address: str, cameras: Cameras) -> None:
    """The command, twice (two connections, either worker): every stream, ids distinct.

    A worker lists the others' streams from their last snapshot (written every
    PUBLISH_INTERVAL_S), so a stream opened on the other worker just now may be missing from
    one answer: each of the two must list every stream within a few publications.
    """
    seen: list[dict[str, object]] = []

    def complete() -> bool:
        streams = top_json(address)["streams"]
        assert isinstance(streams, list)
        seen[:] = streams
        return sorted(s["name"] for s in streams) == sorted(cameras.sessions)

    for _ in range(2):
        wait_until(
            complete,
            "framecast top to list every stream",
            timeout_s=TIMEOUT_S,
            seen=lambda: sorted(str(s["name"]) for s in seen),
            interval_s=0.2,
        )
        assert len({s["id"] for s in seen}) == len(seen)


@pytest.mark.slow
def test_top_lists_every_workers_streams_and_forgets_a_killed_worker(
    cache_dir: Path, tmp_path: Path
) -> None:
    with serve_workers(cache_dir, tmp_path) as host:
        cameras = Cameras(host.address)
        try:
            by_name = spread(cameras)
            assert_top_lists(host.address, cameras)

            # A killed worker's streams leave the listing within a few seconds.
            before = {s.id: s.name for s in by_name.values()}
            victim = serving_pids(host)[1]
            os.kill(victim, signal.SIGKILL)
            survivors = {name for i, name in before.items() if worker_of(i) == 0}
            wait_until(
                lambda: {s.name for s in listed_after_kill(host.address)} == survivors,
                "worker 1's streams to leave the listing",
                timeout_s=TIMEOUT_S,
                seen=lambda: [(s.id, s.name) for s in listed(host.address)],
                interval_s=0.2,
            )
            assert {s.id for s in listed(host.address)} <= set(before)

            # The restarted worker 1 gives its streams ids never listed before.
            wait_until(
                lambda: serving_pids(host).get(1, victim) != victim,
                "worker 1 to serve again",
                timeout_s=TIMEOUT_S,
                interval_s=0.1,
            )
            while True:
                assert len(cameras.sessions) < 60, "no stream reached the restarted worker"
                name = f"cam-{len(cameras.sessions)}"
                cameras.open(name)
                new = listed_as(host.address, name)
                if worker_of(new.id) == 1:
                    break
            assert new.id not in before
            # Worker 1, its second start.
            assert new.id >> START_SHIFT == (1 << (WORKER_SHIFT - START_SHIFT)) | 1
            assert host.process.poll() is None
        finally:
            cameras.close()


@pytest.mark.slow
def test_top_lists_every_front_ends_streams_under_shared_inference(
    cache_dir: Path, tmp_path: Path
) -> None:
    with serve_workers(cache_dir, tmp_path, inference="shared") as host:
        cameras = Cameras(host.address)
        try:
            spread(cameras)
            assert_top_lists(host.address, cameras)
        finally:
            cameras.close()
