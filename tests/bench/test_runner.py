"""The load loops on fake sessions: bounds, error counts, open-loop latency from the schedule."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import grpc
import numpy as np
import pytest
from framecast_bench.inputs import Payload
from framecast_bench.plan import (
    BenchPlan,
)
from framecast_bench.report import WindowResult
from framecast_bench.runner import (
    StepConfig,
    error_name,
    offered_rate,
    run_closed_step,
    run_open_step,
)
from framecast_bench.stats import Window, is_stable
from framecast_client.errors import DeadlineExceededError, UnavailableError
from framecast_client.types import Classification, Prediction, ServerTiming

PAYLOADS = [Payload(batch=np.zeros((2, 4, 4, 3), dtype=np.uint8), preprocess_ms=3.0)]


class FakeSession:
    """Sleeps ``service_s`` per request, reports fixed server timing, fails every ``fail_every``."""

    def __init__(self, service_s: float = 0.001, fail_every: int = 0) -> None:
        self.service_s = service_s
        self.fail_every = fail_every
        self.calls = 0
        self.closed = False
        self._lock = threading.Lock()

    def send(self, payload: Payload) -> Sequence[Classification]:
        with self._lock:
            self.calls += 1
            n = self.calls
        time.sleep(self.service_s)
        if self.fail_every and n % self.fail_every == 0:
            raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "down")
        timing = ServerTiming(queue_ms=0.1, compute_ms=0.2, batch_size=payload.images)
        return [
            Classification(predictions=(Prediction(0, "x", 1.0),), timing=timing)
        ] * payload.images

    def close(self) -> None:
        self.closed = True


def test_closed_step_is_bounded_by_count_and_counts_errors_by_code() -> None:
    session = FakeSession(service_s=0.0005, fail_every=4)
    # Windows of 60 s would never end by time within the test: they end by count.
    config = StepConfig(
        warmup_s=0.0,
        window_s=60.0,
        max_windows=2,
        max_requests_per_window=40,
        stability_windows=3,
    )
    step = run_closed_step(lambda: session, PAYLOADS, 2, config)
    assert session.closed
    assert len(step.windows) == 2
    assert not step.stable  # 2 windows cannot satisfy a 3-window criterion
    for w in step.windows:
        # A window closes at its cap; requests in flight then (one per worker) still land.
        assert 40 <= w.requests + w.errors <= 40 + 2
        assert w.duration_s < 60.0
    assert session.calls <= config.request_budget
    assert set(step.errors) == {"UNAVAILABLE"}
    total = step.requests + step.error_count
    assert step.error_count == pytest.approx(total / 4, abs=3)
    assert step.images == 2 * step.requests
    assert step.split_ms["server_queue"]["mean"] == pytest.approx(0.1)
    assert step.split_ms["server_compute"]["mean"] == pytest.approx(0.2)
    assert step.preprocess_ms["mean"] == pytest.approx(3.0)


def test_closed_step_is_bounded_in_time() -> None:
    session = FakeSession(service_s=0.002)
    # No count cap to speak of: the windows end by time.
    config = StepConfig(
        warmup_s=0.1, window_s=0.2, max_windows=3, stability_windows=3, stability_tolerance=1e-9
    )
    started = time.perf_counter()
    step = run_closed_step(lambda: session, PAYLOADS, 1, config)
    # Generous: only that it stopped by itself, not how fast.
    assert time.perf_counter() - started < 30.0
    assert len(step.windows) == 3
    assert step.requests > 0


def test_session_that_cannot_open_is_reported_not_raised() -> None:
    def factory() -> FakeSession:
        raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "no")

    config = StepConfig(warmup_s=0.0, window_s=0.2, max_windows=2)
    step = run_closed_step(factory, PAYLOADS, 3, config)
    assert step.requests == 0


def test_open_loop_latency_counts_from_the_schedule() -> None:
    # A server that takes 50 ms per request, one request in flight at most, asked for 100/s:
    # it can do 20/s, so a queue builds. Latency from the scheduled time must show it; the
    # time from the actual send (what coordinated omission would report) stays ~50 ms.
    session = FakeSession(service_s=0.05)
    config = StepConfig(warmup_s=0.0, window_s=0.5, max_windows=3, stability_windows=3)
    step = run_open_step(
        lambda: session,
        PAYLOADS,
        100.0,
        config,
        max_inflight=1,
        rng=np.random.default_rng(0),
    )
    assert step.loop == "open"
    assert step.target_rate_rps == 100.0
    assert step.requests > 0
    wait = step.split_ms["client_wait"]["mean"]
    assert wait > 100.0
    assert step.latency_ms["p50"] > 2 * 50.0
    assert step.latency_ms["mean"] == pytest.approx(
        sum(step.split_ms[c]["mean"] for c in step.split_ms), rel=0.01
    )
    # Throughput is what the server managed, not what was offered.
    assert step.throughput_rps < 50.0
    assert step.offered_rps is not None
    assert 50.0 < step.offered_rps < 150.0


def test_offered_rate_counts_the_arrivals_inside_the_windows() -> None:
    windows = [Window(start=10.0, end=11.0), Window(start=11.0, end=13.0)]
    offsets = [0.5, 1.0, 1.5, 2.0, 2.5, 3.5]  # start 9.5: 10.0, 10.5, 11.0, 11.5, 12.0, 13.0
    # The last window, [11, 13): 11.0, 11.5, 12.0 -> 3 in 2 s.
    assert offered_rate(9.5, offsets, windows, used=1) == pytest.approx(1.5)
    # Both, [10, 13): 13.0 is out -> 5 in 3 s.
    assert offered_rate(9.5, offsets, windows, used=2) == pytest.approx(5 / 3)
    assert offered_rate(9.5, offsets[:1], windows, used=2) == pytest.approx(1 / 3)


def test_stability_criterion() -> None:
    def windows(*pairs: tuple[float, float]) -> list[WindowResult]:
        return [WindowResult(1.0, int(t), 0, t, p) for t, p in pairs]

    assert is_stable(windows((100, 10.0), (105, 10.5), (96, 9.5)), 3, 0.10)
    # Only the last three count.
    assert is_stable(windows((10, 99.0), (100, 10.0), (105, 10.5), (96, 9.5)), 3, 0.10)
    assert not is_stable(windows((100, 10.0), (130, 10.0), (100, 10.0)), 3, 0.10)  # throughput
    assert not is_stable(windows((100, 10.0), (100, 14.0), (100, 10.0)), 3, 0.10)  # p99
    assert not is_stable(windows((100, 10.0), (100, 10.0)), 3, 0.10)  # too few
    assert not is_stable(windows((0, float("nan")), (0, float("nan")), (0, float("nan"))), 3, 0.1)


def test_error_names() -> None:
    assert error_name(UnavailableError(grpc.StatusCode.UNAVAILABLE, "x")) == "UNAVAILABLE"
    assert error_name(ValueError("bad")) == "ValueError"


@pytest.mark.parametrize(
    ("concurrency", "rates"), [((), ()), ((1,), (10.0,)), ((0,), ()), ((), (-1.0,))]
)
def test_plan_validation(concurrency: tuple[int, ...], rates: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match=r"concurrency|rates"):
        BenchPlan(concurrency=concurrency, rates=rates)
