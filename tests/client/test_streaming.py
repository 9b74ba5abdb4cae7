"""Client.stream and AsyncClient.stream against real servers on the NullBackend.

The NullBackend's top class is the first byte of the preprocessed image, so a frame filled with
one value ``k`` must come back as class ``k`` (top-k: ``k, k+1, ...``): every result is checked
against the frame it claims to be.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from framecast_client import (
    AsyncClient,
    Backoff,
    Client,
    InvalidImageError,
    RpcError,
    StreamResult,
    StreamSession,
    UnavailableError,
)
from framecast_client.streaming.drive import _retriable
from framecast_server.process.background import BackgroundServer
from numpy.typing import NDArray
from support import HoldableNullBackend, make_settings

TIMEOUT_S = 60.0
FRAME_SIZE = 32


def keyed_frame(key: int) -> NDArray[np.uint8]:
    """A frame whose every pixel is ``key``: the NullBackend classifies it as class ``key``."""
    return np.full((FRAME_SIZE, FRAME_SIZE, 3), key, dtype=np.uint8)


def check(result: StreamResult, key: int, top_k: int = 1) -> None:
    predictions = result.classification.predictions
    assert [p.index for p in predictions] == [(key + j) % 1000 for j in range(top_k)]


@pytest.fixture(scope="module")
def null_server(cache_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(make_settings(cache_dir, backend="null", max_batch=32)) as server:
        yield server


def gated_server(
    cache_dir: Path, backend: HoldableNullBackend, *, port: int = 0
) -> BackgroundServer:
    settings = make_settings(cache_dir, backend="null", max_batch=32, port=port)
    return BackgroundServer(settings, backend_factory=lambda _path: backend)


def test_lossless_1000_frames_over_8_streams_lose_nothing(null_server: BackgroundServer) -> None:
    streams, per_stream = 8, 125
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 256, size=(streams, per_stream))

    def run(stream: int) -> list[StreamResult]:
        frames = (keyed_frame(int(k)) for k in keys[stream])
        with (
            Client(null_server.address) as client,
            client.stream(frames, mode="lossless", top_k=3, max_in_flight=8) as session,
        ):
            results = list(session)
            stats = session.stats
        assert stats.read == stats.sent == stats.received == per_stream
        assert stats.dropped == stats.errors == stats.resent == 0
        assert 1 <= stats.max_in_flight <= 8
        assert stats.latency_ms.count == per_stream
        return results

    with ThreadPoolExecutor(streams) as pool:
        all_results = list(pool.map(run, range(streams)))
    for stream, results in enumerate(all_results):
        assert [r.index for r in results] == list(range(per_stream))
        ids = [r.frame_id for r in results]
        assert ids == sorted(set(ids))
        for result in results:
            check(result, int(keys[stream, result.index]), top_k=3)
            assert result.latency_ms > 0


async def test_64_concurrent_async_streams_all_get_their_results(
    null_server: BackgroundServer,
) -> None:
    streams, per_stream = 64, 12

    async def run(stream: int) -> None:
        keys = [(stream * 31 + 7 * i) % 256 for i in range(per_stream)]
        async with AsyncClient(null_server.address) as client:
            frames = [keyed_frame(k) for k in keys]
            async with client.stream(frames, mode="lossless", max_in_flight=4) as session:
                results = [r async for r in session]
            assert session.stats.received == per_stream
        assert [r.index for r in results] == list(range(per_stream))
        for result in results:
            check(result, keys[result.index])

    await asyncio.wait_for(asyncio.gather(*(run(s) for s in range(streams))), TIMEOUT_S)


def test_realtime_drops_the_oldest_frames_and_the_latest_wins(cache_dir: Path) -> None:
    backend = HoldableNullBackend()
    count, max_in_flight = 200, 2
    source_done = threading.Event()

    def source() -> Iterator[NDArray[np.uint8]]:
        try:
            for i in range(count):
                yield keyed_frame(i % 256)
        finally:
            source_done.set()

    with gated_server(cache_dir, backend) as server, Client(server.address) as client:
        # The server answers nothing until the whole source has been read: a camera far
        # faster than the server.
        backend.hold()
        with client.stream(source(), mode="realtime", max_in_flight=max_in_flight) as session:
            assert source_done.wait(TIMEOUT_S)
            assert backend.entered.wait(TIMEOUT_S)
            held = session.stats
            assert held.read == count
            assert held.sent <= max_in_flight
            assert held.in_flight <= max_in_flight
            backend.release()
            results = list(session)
            stats = session.stats
    indices = [r.index for r in results]
    assert indices == sorted(set(indices))
    assert indices[-1] == count - 1  # the latest frame is never the one dropped
    # Sent while held, then whatever the one-frame buffers still held: the newest frames.
    assert len(results) <= max_in_flight + 2
    assert stats.dropped == count - len(results) > 0
    assert stats.received == len(results)
    assert stats.max_in_flight <= max_in_flight
    for result in results:
        check(result, result.index % 256)


def test_lossless_stream_survives_a_server_restart_and_loses_nothing(
    cache_dir: Path, stream_broke: threading.Event
) -> None:
    count = 60
    backend = HoldableNullBackend()
    first = gated_server(cache_dir, backend).__enter__()
    port = first.port
    reached = threading.Event()
    restarted: list[BackgroundServer] = []
    failures: list[BaseException] = []

    def chaos() -> None:
        try:
            assert reached.wait(TIMEOUT_S)
            backend.hold()
            # A frame is now stuck in the server: sent by the client, never answered.
            assert backend.entered.wait(TIMEOUT_S)
            killer = threading.Thread(target=first.close, kwargs={"grace": 0})
            killer.start()
            assert stream_broke.wait(TIMEOUT_S)
            backend.release()  # lets the server's shutdown finish; the call is already gone
            killer.join(TIMEOUT_S)
            settings = make_settings(cache_dir, backend="null", max_batch=32, port=port)
            restarted.append(BackgroundServer(settings).__enter__())
        except BaseException as exc:
            failures.append(exc)
            backend.release()

    helper = threading.Thread(target=chaos)
    results: list[StreamResult] = []
    try:
        with Client(first.address) as client:
            frames = (keyed_frame(i % 256) for i in range(count))
            backoff = Backoff(initial_s=0.05, max_s=0.5)
            with client.stream(frames, mode="lossless", backoff=backoff) as session:
                helper.start()
                for result in session:
                    results.append(result)
                    if result.index == 19:
                        reached.set()
                stats = session.stats
    finally:
        reached.set()
        backend.release()
        if helper.is_alive():
            helper.join(TIMEOUT_S)
        first.close(grace=0)
        for server in restarted:
            server.close(grace=0)
    assert not failures
    assert [r.index for r in results] == list(range(count))
    for result in results:
        check(result, result.index % 256)
    # One outage, however many attempts reconnecting took: one disconnect, one reconnect.
    assert stats.disconnects == 1
    assert stats.reconnects == 1
    assert stats.resent >= 1  # the frame stuck in the dead server was sent again
    assert stats.dropped == stats.errors == 0
    assert stats.received == count


class CountingSource:
    """An endless source of keyed frames at about 200 fps; counts what it produced."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._cond = threading.Condition()
        self.produced = 0

    def __iter__(self) -> Iterator[NDArray[np.uint8]]:
        i = 0
        # The pace is the camera's own: a camera this fast is what realtime mode is for.
        while not self.stop.wait(0.005):
            yield keyed_frame(i % 256)
            i += 1
            with self._cond:
                self.produced = i
                self._cond.notify_all()

    def wait_for(self, produced: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.produced >= produced, TIMEOUT_S)


def test_realtime_stream_drops_frames_during_an_outage_and_carries_on(
    cache_dir: Path, stream_broke: threading.Event
) -> None:
    settings = make_settings(cache_dir, backend="null", max_batch=32)
    first = BackgroundServer(settings).__enter__()
    port = first.port
    source = CountingSource()
    reached = threading.Event()
    restarted_at: list[int] = []
    restarted: list[BackgroundServer] = []
    failures: list[BaseException] = []

    def chaos() -> None:
        try:
            assert reached.wait(TIMEOUT_S)
            first.close(grace=0)
            assert stream_broke.wait(TIMEOUT_S)
            # The camera goes on while the server is away.
            assert source.wait_for(source.produced + 8)
            restarted_at.append(source.produced)
            again = make_settings(cache_dir, backend="null", max_batch=32, port=port)
            restarted.append(BackgroundServer(again).__enter__())
        except BaseException as exc:
            failures.append(exc)
            source.stop.set()

    helper = threading.Thread(target=chaos)
    results: list[StreamResult] = []
    try:
        with (
            Client(first.address) as client,
            client.stream(
                source, mode="realtime", backoff=Backoff(initial_s=0.05, max_s=0.5)
            ) as session,
        ):
            helper.start()
            for result in session:
                results.append(result)
                if len(results) == 10:
                    reached.set()
                if restarted_at and result.index > restarted_at[0]:
                    source.stop.set()  # a frame captured after the restart came back
            stats = session.stats
    finally:
        reached.set()
        source.stop.set()
        helper.join(TIMEOUT_S)
        first.close(grace=0)
        for server in restarted:
            server.close(grace=0)
    assert not failures
    indices = [r.index for r in results]
    assert indices == sorted(set(indices))
    assert indices[-1] > restarted_at[0]
    for result in results:
        check(result, result.index % 256)
    assert stats.disconnects >= 1
    assert stats.reconnects >= 1
    assert stats.dropped > 0
    assert stats.read == stats.received + stats.dropped  # every frame accounted for


def test_a_frame_the_client_cannot_read_is_a_per_frame_error(
    null_server: BackgroundServer,
) -> None:
    frames: list[object] = [keyed_frame(i) for i in range(12)]
    frames[4] = b"this is not an image"
    frames[7] = 3.14
    with (
        Client(null_server.address) as client,
        client.stream(frames, mode="lossless") as session,  # type: ignore[arg-type]
    ):
        results = list(session)
        stats = session.stats
    assert [r.index for r in results] == list(range(12))
    for result in results:
        if result.index in (4, 7):
            assert not result.ok
            assert result.error is not None
            assert result.error.origin == "client"
            assert result.error.code is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(InvalidImageError):
                _ = result.classification
        else:
            assert result.ok
            assert result.error is None
            check(result, result.index)
    assert stats.errors == 2
    assert stats.sent == 10
    assert stats.received == 12


def test_a_frame_the_server_fails_is_a_per_frame_error(cache_dir: Path) -> None:
    backend = HoldableNullBackend(fail_key=13)
    keys = [10, 11, 12, 13, 14, 15]
    with gated_server(cache_dir, backend) as server, Client(server.address) as client:
        frames = [keyed_frame(k) for k in keys]
        # One frame in flight: batches of one, so only the bad frame fails.
        with client.stream(frames, mode="lossless", max_in_flight=1) as session:
            results = list(session)
    assert [r.index for r in results] == list(range(len(keys)))
    bad = results[3]
    assert bad.error is not None
    assert bad.error.origin == "server"
    assert bad.error.code is grpc.StatusCode.INTERNAL
    assert "cannot classify key 13" in bad.error.message
    with pytest.raises(RpcError):
        _ = bad.classification
    for result in results[:3] + results[4:]:
        check(result, keys[result.index])


def test_without_reconnect_a_lost_server_ends_the_stream(
    cache_dir: Path,
) -> None:
    server = BackgroundServer(make_settings(cache_dir, backend="null", max_batch=32)).__enter__()
    source = CountingSource()

    def drain(session: StreamSession) -> None:
        for result in session:
            check(result, result.index % 256)

    try:
        with (
            Client(server.address) as client,
            client.stream(source, mode="realtime", reconnect=False) as session,
        ):
            first = next(session)
            check(first, first.index % 256)
            server.close(grace=0)
            with pytest.raises(UnavailableError, match="no Framecast server answers"):
                drain(session)
    finally:
        source.stop.set()
        server.close(grace=0)


def test_closing_the_session_stops_its_threads(null_server: BackgroundServer) -> None:
    def endless() -> Iterator[NDArray[np.uint8]]:
        i = 0
        while True:
            yield keyed_frame(i % 256)
            i += 1

    with Client(null_server.address) as client:
        session = client.stream(endless(), mode="realtime")
        with session:
            first = next(session)
            check(first, first.index % 256)
        with pytest.raises(StopIteration):
            next(session)
    alive = [t.name for t in threading.enumerate() if t.name.startswith("framecast-stream")]
    assert alive == []


def test_stream_arguments_are_checked(null_server: BackgroundServer) -> None:
    with Client(null_server.address) as client:
        with pytest.raises(ValueError, match="max_in_flight"):
            client.stream([], max_in_flight=0)
        with pytest.raises(ValueError, match="top_k"):
            client.stream([], top_k=1001)
        with pytest.raises(ValueError, match="mode"):
            client.stream([], mode="fast")  # type: ignore[arg-type]


def test_an_empty_source_ends_at_once(null_server: BackgroundServer) -> None:
    with Client(null_server.address) as client, client.stream([], mode="lossless") as session:
        assert list(session) == []
        assert session.stats.read == 0


def test_backoff_grows_exponentially_up_to_its_cap_with_jitter() -> None:
    backoff = Backoff(initial_s=0.1, max_s=2.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(1)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    for attempt, ceiling in enumerate(ceilings):
        delays = [backoff.delay(attempt, rng) for _ in range(200)]
        assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling * 0.3  # jittered, not fixed
    assert backoff.delay(10_000, rng) <= 2.0  # no overflow far past the cap
    exact = Backoff(initial_s=0.1, max_s=1.0, jitter=0.0)
    assert [exact.delay(n) for n in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": 0.0},
        {"initial_s": 2.0, "max_s": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"give_up_after_s": 0.0},
    ],
)
def test_backoff_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        Backoff(**kwargs)


@pytest.mark.parametrize(
    ("code", "details", "retried"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", True),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
        # grpc.aio's report of a write to a stream whose server went away (grpc/grpc#36066).
        (grpc.StatusCode.INTERNAL, "Internal error from Core", True),
        (grpc.StatusCode.INTERNAL, "inference failed on the server", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "connection reset", False),
    ],
)
def test_which_failures_count_as_a_lost_server(
    code: grpc.StatusCode, details: str, retried: bool
) -> None:
    assert _retriable(code, details) is retried
