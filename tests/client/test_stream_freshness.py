"""Frame age and backpressure on streams, against real servers on port 0 and real channels.

Each result states its age (the client's capture-to-send time plus the server's own time);
frames older than the stream's max_age are dropped before compute and counted by reason; the
server's rate hint reaches realtime sessions, which then skip frames at capture, while a
lossless session still answers every frame.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from framecast_client import Client
from framecast_server.process.background import BackgroundServer
from numpy.typing import NDArray
from prometheus_client.parser import text_string_to_metric_families
from support import HoldableNullBackend, running_server, wait_until

TIMEOUT_S = 60.0
FRAME_SIZE = 32


def keyed_frame(key: int) -> NDArray[np.uint8]:
    """A frame whose every pixel is ``key``: the NullBackend classifies it as class ``key``."""
    return np.full((FRAME_SIZE, FRAME_SIZE, 3), key, dtype=np.uint8)


class RecordingBackend(HoldableNullBackend):
    """A holdable NullBackend that records the keys it computed and may take time per image."""

    def __init__(self, per_image_s: float = 0.0) -> None:
        super().__init__()
        self.keys: list[int] = []
        self.per_image_s = per_image_s

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        output = super().infer(images)
        if self.per_image_s:
            time.sleep(self.per_image_s * len(images))
        self.keys.extend(int(k) for k in images[:, 0, 0, 0])
        return output


def serve(
    cache_dir: Path, backend: RecordingBackend, **settings: Any
) -> AbstractContextManager[BackgroundServer]:
    """The shared test server with this backend and room for a batch of 32."""
    return running_server(cache_dir, backend_instance=backend, max_batch=32, **settings)


def first_then_rest(
    backend: RecordingBackend, keys: list[int], *, interval_s: float = 0.0
) -> Iterator[NDArray[np.uint8]]:
    """Yield the first frame, wait until the backend holds it, then the rest."""
    yield keyed_frame(keys[0])
    assert backend.entered.wait(TIMEOUT_S)
    for key in keys[1:]:
        yield keyed_frame(key)
        time.sleep(interval_s)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_result_states_its_age_including_its_time_queued_on_the_server(
    cache_dir: Path,
) -> None:
    backend = RecordingBackend()
    with serve(cache_dir, backend) as server, Client(server.address) as client:
        backend.hold()
        frames = first_then_rest(backend, [1, 2, 3, 4])
        with client.stream(frames, mode="lossless", max_in_flight=4) as session:
            assert backend.entered.wait(TIMEOUT_S)
            serving = server.serving
            assert serving is not None
            batcher = serving.batcher
            # Frames 2-4 reach the server's queue, then wait there while the backend is held.
            wait_until(lambda: batcher.queued == 3, "frames 2-4 queued on the server",
                       seen=lambda: f"{batcher.queued} queued")  # fmt: skip
            time.sleep(0.5)
            backend.release()
            results = list(session)
    assert [r.ok for r in results] == [True] * 4
    for result in results:
        assert result.age_ms is not None
        # The age ends where compute starts, before the answer: never above the latency.
        assert 0 <= result.age_ms <= result.latency_ms
    # Frames 2-4 were read after frame 1 entered the held backend and computed after release.
    assert min(r.age_ms or 0.0 for r in results[1:]) >= 450


def test_stale_frames_are_dropped_before_compute_and_counted_by_reason(cache_dir: Path) -> None:
    backend = RecordingBackend()
    keys = [1, 2, 3, 4, 5, 6]
    with (
        serve(cache_dir, backend, metrics_port=0) as server,
        Client(server.address) as client,
    ):
        port = server.server.wiring.metrics_port
        assert port is not None
        backend.keys.clear()  # the warm-up image
        backend.hold()
        frames = first_then_rest(backend, keys)
        with client.stream(frames, mode="lossless", max_in_flight=2, max_age=0.5) as session:
            assert backend.entered.wait(TIMEOUT_S)
            # Frame 2 waits in the queue past its max age; the frames after it wait on the
            # client (the window is full) and leave older than their max age.
            time.sleep(1.5)
            backend.release()
            results = list(session)
        samples = scrape(port)
    assert [r.index for r in results] == list(range(len(keys)))
    assert results[0].ok
    dropped = results[1:]
    for result in dropped:
        error = result.error
        assert error is not None
        assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert error.origin == "server"
        assert error.drop_reason in {"stale_at_compute", "stale_at_admission"}
        assert "max age of 500 ms" in error.message
        assert result.age_ms is None  # never computed
    first, last = dropped[0].error, dropped[-1].error
    assert first is not None
    assert first.drop_reason == "stale_at_compute"
    assert last is not None
    assert last.drop_reason == "stale_at_admission"
    # Dropped before compute: only frame 1 reached the backend.
    assert backend.keys == [1]
    by_reason = {
        reason: samples.get(
            ("framecast_stream_frames_dropped_total", frozenset({("reason", reason)})), 0.0
        )
        for reason in ("stale_at_compute", "stale_at_admission")
    }
    for reason, count in by_reason.items():
        assert count == sum(1 for r in dropped if r.error and r.error.drop_reason == reason)
    assert samples[("framecast_frame_age_seconds_count", frozenset({("at", "compute")}))] == 1
    assert samples[("framecast_frame_age_seconds_count", frozenset({("at", "admission")}))] == 6


def test_a_bad_max_age_fails_the_stream_with_invalid_argument(cache_dir: Path) -> None:
    backend = RecordingBackend()
    with serve(cache_dir, backend) as server:
        channel = grpc.insecure_channel(server.address)
        call = channel.stream_stream("/framecast.v1.Classifier/ClassifyStream")  # type: ignore[call-arg]
        try:
            replies = call(iter(()), metadata=(("framecast-max-age-ms", "soon"),), timeout=30)
            with pytest.raises(grpc.RpcError) as refused:
                list(replies)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "framecast-max-age-ms" in (refused.value.details() or "")
        finally:
            channel.close()


def paced(count: int, fps: float, stop: threading.Event) -> Iterator[NDArray[np.uint8]]:
    """``count`` frames at ``fps``, as a camera captures them (open loop)."""
    start = time.monotonic()
    for i in range(count):
        if stop.is_set():
            return
        delay = start + i / fps - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield keyed_frame(i % 256)


def test_the_rate_hint_reaches_the_sdk_and_realtime_skips_frames_while_lossless_answers_all(
    cache_dir: Path,
) -> None:
    # 20 ms per image: the server computes at most 50 frames/s; the camera captures 100.
    backend = RecordingBackend(per_image_s=0.02)
    stop = threading.Event()
    with serve(cache_dir, backend) as server, Client(server.address) as client:
        with client.stream(paced(300, 100.0, stop), mode="realtime") as session:
            results = list(session)
            realtime = session.stats
        with client.stream(paced(120, 100.0, stop), mode="lossless") as session:
            lossless_results = list(session)
            lossless = session.stats
    # The hint reached the SDK and says less than the camera's rate.
    assert 0 < realtime.rate_hint_fps < 100
    # Frames were skipped at capture: read but never prepared nor sent.
    assert realtime.skipped > 0
    assert realtime.sent < realtime.read
    assert realtime.read == realtime.sent + realtime.dropped
    assert realtime.bytes_sent > 0
    assert all(r.ok for r in results)
    # Lossless ignores the hint and answers every frame.
    assert lossless.skipped == 0
    assert lossless.read == lossless.sent == lossless.received == 120
    assert all(r.ok for r in lossless_results)
    assert lossless.rate_hint_fps > 0
