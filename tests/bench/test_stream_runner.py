"""Stream mode's step drivers, on a fake stream session (Client.stream is not required)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from framecast_bench.inputs import Payload
from framecast_bench.runner import BenchUnavailableError, StepConfig
from framecast_bench.stream_runner import (
    client_stream_opener,
    run_stream_closed_step,
    run_stream_open_step,
)
from framecast_client.types import Classification, Prediction, ServerTiming

PAYLOADS = [
    Payload(batch=np.full((1, 4, 4, 3), i, dtype=np.uint8), preprocess_ms=1.0) for i in range(3)
]


class FakeStream:
    """Serves frames one at a time (``service_s`` each), in order; fails every ``fail_every``."""

    def __init__(self, frames: Iterable[Any], service_s: float, fail_every: int = 0) -> None:
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.results: queue.Queue[Any] = queue.Queue()
        self.closed = threading.Event()
        self.service_s = service_s
        self.fail_every = fail_every
        # Like the real session: a reader pulls frames as soon as the source gives them.
        threading.Thread(target=self._read, args=(frames,), daemon=True).start()
        threading.Thread(target=self._serve, daemon=True).start()

    def _read(self, frames: Iterable[Any]) -> None:
        for i, frame in enumerate(frames):
            assert frame.shape == (4, 4, 3)
            self.inbox.put((i, frame))
        self.inbox.put(None)

    def _serve(self) -> None:
        timing = ServerTiming(queue_ms=0.0, compute_ms=self.service_s * 1000.0, batch_size=1)
        while (item := self.inbox.get()) is not None and not self.closed.is_set():
            i, _ = item
            time.sleep(self.service_s)
            outcome: Any
            if self.fail_every and (i + 1) % self.fail_every == 0:
                outcome = SimpleNamespace(code=grpc.StatusCode.INTERNAL, message="boom")
            else:
                outcome = Classification((Prediction(0, "x", 1.0),), timing)
            self.results.put(SimpleNamespace(index=i, outcome=outcome))
        self.results.put(None)

    def __iter__(self) -> Iterator[Any]:
        while (item := self.results.get()) is not None:
            yield item

    def close(self) -> None:
        self.closed.set()


def opener(service_s: float, fail_every: int = 0) -> Any:
    return lambda frames, max_in_flight: FakeStream(frames, service_s, fail_every)


def test_closed_loop_over_a_stream() -> None:
    config = StepConfig(warmup_s=0.2, window_s=0.4, max_windows=3)
    step = run_stream_closed_step(opener(0.002, fail_every=10), PAYLOADS, 3, config)
    assert step.loop == "closed"
    assert step.concurrency == 3
    assert step.requests > 0
    assert set(step.errors) == {"INTERNAL"}
    assert step.error_count == pytest.approx((step.requests + step.error_count) / 10, abs=2)
    # Three frames in the system, served one at a time: each waits for the other two.
    assert step.latency_ms["p50"] > 2 * 2.0
    assert step.split_ms["server_compute"]["mean"] == pytest.approx(2.0)
    in_system = step.throughput_rps * step.latency_ms["mean"] / 1000.0
    # Errors are in the system too; they are a tenth of the frames.
    assert in_system == pytest.approx(3 * 0.9, rel=0.15)


def test_open_loop_over_a_stream_counts_from_the_schedule() -> None:
    # 50 ms per frame (20/s) offered 100/s: a queue builds and the latency shows it.
    config = StepConfig(warmup_s=0.0, window_s=0.5, max_windows=3)
    step = run_stream_open_step(opener(0.05), PAYLOADS, 100.0, config, rng=np.random.default_rng(1))
    assert step.loop == "open"
    assert step.requests > 0
    assert step.latency_ms["p50"] > 2 * 50.0
    assert step.throughput_rps < 50.0


def test_client_stream_opener_passes_lossless_without_reconnection() -> None:
    calls: list[dict[str, Any]] = []

    class Client:
        def stream(self, frames: Iterable[Any], **kwargs: Any) -> str:
            calls.append(kwargs)
            return "session"

    assert client_stream_opener(Client(), top_k=3)(iter(()), 5) == "session"
    assert calls == [{"mode": "lossless", "max_in_flight": 5, "top_k": 3, "reconnect": False}]


def test_a_stream_api_of_another_shape_is_reported_unavailable() -> None:
    class Client:
        def stream(self, frames: Iterable[Any]) -> None: ...

    with pytest.raises(BenchUnavailableError, match="does not take"):
        client_stream_opener(Client(), top_k=1)(iter(()), 1)
