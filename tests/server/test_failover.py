"""Three replicas on loopback addresses and one SDK client with round robin (client-side balancing).

Every replica gets a fair share; one killed mid-run (a real process, SIGKILL) costs no unary
call and no stream frame; one drained moves its stream to the others without loss. Each
replica records the key (first pixel) of every image it classified, so a test can tell which
replica served what.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
from framecast_client import AsyncClient, Client, StreamResult, StreamSession
from framecast_server.backends.base import BackendInfo
from framecast_server.backends.null import NullBackend
from framecast_server.process.background import BackgroundServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import NDArray
from support import INPUT_SIZE, make_settings, wait_until

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
UNARY_KEY = 255
DEADLINE_S = 60.0


class KeyRecorder:
    """A null backend that records the first pixel of every image it classifies."""

    def __init__(self) -> None:
        self._inner = NullBackend(max_batch=32)
        self.keys: list[int] = []

    @property
    def info(self) -> BackendInfo:
        return self._inner.info

    @property
    def max_batch(self) -> int:
        return self._inner.max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.keys.extend(int(v) for v in images[:, 0, 0, 0])  # one batch thread per replica
        return self._inner.infer(images)

    def count(self, key: int) -> int:
        return self.keys.count(key)

    def close(self) -> None:
        self._inner.close()


def frame(key: int) -> NDArray[np.uint8]:
    """A uniform frame: it keeps its key through the client's resize and crop."""
    return np.full((INPUT_SIZE, INPUT_SIZE, 3), key, dtype=np.uint8)


def replica(cache_dir: Path, host: str, port: int = 0) -> tuple[BackgroundServer, KeyRecorder]:
    recorder = KeyRecorder()
    server = BackgroundServer(
        make_settings(cache_dir, backend="null", host=host, port=port),
        backend_factory=lambda _: recorder,
    )
    return server, recorder


def free_port(host: str) -> int:
    """A port the OS says is free on ``host``, for a replica that starts after the client."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Source:
    """Frames of one key, as many as the session reads, until ``finish()``; then ``tail`` more.

    A lossless session reads only as fast as the server answers, so the stream is still
    running whenever the test acts on its replica.
    """

    def __init__(self, key: int, tail: int = 40) -> None:
        self.key = key
        self.tail = tail
        self.count = 0
        self._finish = threading.Event()

    def finish(self) -> None:
        self._finish.set()

    def __iter__(self) -> Iterator[NDArray[np.uint8]]:
        image = frame(self.key)
        while not self._finish.is_set():
            self.count += 1
            yield image
        for _ in range(self.tail):
            self.count += 1
            yield image


def check_exactly_once(results: list[StreamResult], source: Source) -> None:
    assert [r.index for r in results] == list(range(source.count))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]


@pytest.fixture(scope="module")
def three_replicas(cache_dir: Path) -> Iterator[list[tuple[BackgroundServer, KeyRecorder]]]:
    with ExitStack() as stack:
        replicas = [replica(cache_dir, host) for host in HOSTS]
        for server, _ in replicas:
            stack.enter_context(server)
        yield replicas


def test_round_robin_gives_every_replica_a_fair_share(
    three_replicas: list[tuple[BackgroundServer, KeyRecorder]],
) -> None:
    recorders = [recorder for _, recorder in three_replicas]
    with Client([server.address for server, _ in three_replicas], timeout=30) as client:
        batch = frame(UNARY_KEY)[None]
        # Round robin uses the replicas whose connections are ready: connect to all first.
        for _ in range(30):
            client.classify_preprocessed(batch)
        before = [r.count(UNARY_KEY) for r in recorders]
        assert all(before), before
        calls = 300
        for _ in range(calls):
            client.classify_preprocessed(batch)
        shares = [r.count(UNARY_KEY) - b for r, b in zip(recorders, before, strict=True)]
    assert sum(shares) == calls
    assert all(0.9 * calls / 3 <= share <= 1.1 * calls / 3 for share in shares), shares


def test_a_dns_target_balances_over_what_the_name_resolves_to(
    three_replicas: list[tuple[BackgroundServer, KeyRecorder]],
) -> None:
    # localhost resolves to 127.0.0.1 (and ::1, where nothing listens on this port): round
    # robin uses the addresses that answer.
    server, recorder = three_replicas[0]
    key = UNARY_KEY - 2
    with Client(f"dns:///localhost:{server.port}", timeout=30) as client:
        for _ in range(10):
            client.classify_preprocessed(frame(key)[None])
    assert recorder.count(key) == 10


async def test_the_async_client_balances_the_same_way(
    three_replicas: list[tuple[BackgroundServer, KeyRecorder]],
) -> None:
    recorders = [recorder for _, recorder in three_replicas]
    addresses = [server.address for server, _ in three_replicas]
    async with AsyncClient(addresses, timeout=30) as client:
        batch = frame(UNARY_KEY - 1)[None]
        calls = 90
        for _ in range(calls):
            await client.classify_preprocessed(batch)
    shares = [r.count(UNARY_KEY - 1) for r in recorders]
    assert sum(shares) == calls
    # Connections come up one by one at first; then the rotation is exact.
    assert all(share >= calls / 3 / 2 for share in shares), shares


def test_streams_spread_over_the_replicas(
    three_replicas: list[tuple[BackgroundServer, KeyRecorder]],
) -> None:
    sessions = 12
    with Client([server.address for server, _ in three_replicas], timeout=30) as client:

        def run(key: int) -> int:
            frames = [frame(key)] * 5
            with client.stream(frames, mode="lossless") as session:
                return sum(1 for result in session if result.ok)

        with ThreadPoolExecutor(sessions) as pool:
            assert list(pool.map(run, range(1, sessions + 1))) == [5] * sessions
    # Each session's channel starts its round robin at a random replica: twelve sessions all
    # on one replica would happen about once in 177,000 runs.
    used = [{k for k in recorder.keys if 1 <= k <= sessions} for _, recorder in three_replicas]
    assert sum(1 for keys in used if keys) >= 2, used
    assert set().union(*used) == set(range(1, sessions + 1))


def health_serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def stalled_with_frames_in_flight(
    session: StreamSession, quiet_s: float = 0.5
) -> Callable[[], bool]:
    """A condition: frames are in flight and no answer has arrived for ``quiet_s``."""
    last = [-1, time.monotonic()]

    def check() -> bool:
        stats = session.stats
        now = time.monotonic()
        if stats.received != last[0]:
            last[:] = [stats.received, now]
            return False
        return stats.in_flight > 0 and now - last[1] >= quiet_s

    return check


@pytest.fixture
def victim(cache_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A replica in its own process (`framecast serve`) on the third loopback address."""
    port_file = tmp_path / "port"
    command = [
        sys.executable, "-m", "framecast_client.cli", "serve",
        "--host", HOSTS[2], "--port", "0", "--port-file", str(port_file),
        "--backend", "null", "--offline", "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "PYTHONWARNINGS": "error"})
    try:
        wait_until(
            lambda: port_file.exists() or process.poll() is not None,
            "the port file",
            timeout_s=DEADLINE_S,
        )
        assert process.poll() is None, "the server exited before listening"
        address = f"{HOSTS[2]}:{port_file.read_text().strip()}"
        wait_until(lambda: health_serving(address), "the victim to serve", timeout_s=DEADLINE_S)
        yield process, address
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_a_replica_killed_mid_run_costs_no_call_and_no_frame(
    cache_dir: Path, victim: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, victim_address = victim
    ports = [free_port(host) for host in HOSTS[:2]]
    # Only the victim is up when the stream starts, so the stream runs on it.
    addresses = [f"{host}:{port}" for host, port in zip(HOSTS, ports, strict=False)]
    source = Source(key=7)
    results: list[StreamResult] = []
    unary_done = threading.Event()
    unary_ok = [0, 0]  # calls answered before, after the kill
    killed = threading.Event()

    with (
        Client([*addresses, victim_address], timeout=30) as client,
        client.stream(source, mode="lossless") as session,
        ExitStack() as stack,
        ThreadPoolExecutor(4) as pool,
    ):
        # Results are taken all along, so frames keep flowing (a session whose results are
        # not taken stops sending).
        consumer = pool.submit(results.extend, session)
        wait_until(lambda: len(results) >= 50, "50 results from the victim", timeout_s=DEADLINE_S)
        survivors = [replica(cache_dir, h, p) for h, p in zip(HOSTS, ports, strict=False)]
        for server, _ in survivors:
            stack.enter_context(server)

        def call_repeatedly() -> None:
            batch = frame(UNARY_KEY)[None]
            while not unary_done.is_set():
                client.classify_preprocessed(batch)  # any failure fails the test
                unary_ok[killed.is_set()] += 1

        callers = [pool.submit(call_repeatedly) for _ in range(3)]
        recorders = [recorder for _, recorder in survivors]
        wait_until(
            lambda: all(r.count(UNARY_KEY) for r in recorders),
            "calls on both survivors",
            timeout_s=DEADLINE_S,
        )
        # Freeze the victim with frames in flight, then kill it: those frames must be resent.
        # Answers the victim wrote just before it stopped still arrive, so "in flight" alone is
        # not enough (they can all be answered a moment later): wait until no answer has come
        # for a while and frames are still outstanding, which only a frozen victim explains.
        process.send_signal(signal.SIGSTOP)
        wait_until(
            stalled_with_frames_in_flight(session),
            "frames in flight on the frozen victim, no answer for 0.5 s",
            timeout_s=DEADLINE_S,
            seen=lambda: session.stats,
        )
        process.kill()
        process.wait()
        killed.set()
        at_kill = len(results)
        wait_until(lambda: len(results) >= at_kill + 50, "50 more results", timeout_s=DEADLINE_S)
        source.finish()
        consumer.result(timeout=DEADLINE_S)
        unary_done.set()
        for caller in callers:
            caller.result(timeout=DEADLINE_S)
        stats = session.stats

    check_exactly_once(results, source)
    assert stats.resent > 0, stats
    assert stats.reconnects >= 1, stats
    # What was in flight on the victim and everything read after the kill ran on survivors.
    assert sum(r.count(source.key) for r in recorders) >= stats.resent + source.tail
    assert unary_ok[0] > 0, unary_ok
    assert unary_ok[1] > 0, unary_ok


def test_a_drained_replica_moves_its_stream_without_loss(cache_dir: Path) -> None:
    ports = [free_port(host) for host in HOSTS[1:]]
    drained, drained_recorder = replica(cache_dir, HOSTS[0])
    source = Source(key=9)
    results: list[StreamResult] = []
    with drained, ExitStack() as stack, ThreadPoolExecutor(1) as pool:
        addresses = [drained.address] + [
            f"{host}:{port}" for host, port in zip(HOSTS[1:], ports, strict=True)
        ]
        with Client(addresses, timeout=30) as client:
            with client.stream(source, mode="lossless") as session:
                stream = iter(session)
                results.extend(next(stream) for _ in range(50))  # on the drained-to-be replica
                others = [replica(cache_dir, h, p) for h, p in zip(HOSTS[1:], ports, strict=True)]
                for server, _ in others:
                    stack.enter_context(server)
                served_before = drained_recorder.count(source.key)
                assert served_before >= 50
                # The graceful stop of SIGTERM: NOT_SERVING, GOAWAY, in-flight calls finish
                # within the grace period, and the stream is ended.
                draining = pool.submit(drained.close, 1.0)
                recorders = [recorder for _, recorder in others]
                while sum(r.count(source.key) for r in recorders) < 50:
                    results.append(next(stream))
                source.finish()
                results.extend(stream)
                stats = session.stats
            draining.result(timeout=DEADLINE_S)
    check_exactly_once(results, source)
    assert stats.reconnects >= 1, stats
    moved = sum(r.count(source.key) for r in recorders)
    # Every frame was classified by one replica or the other; a resent one maybe by both.
    assert source.count <= drained_recorder.count(source.key) + moved <= source.count + stats.resent
