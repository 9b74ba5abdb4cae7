"""Fixtures of the bench tests: builders of results, a hand-moved clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from framecast_bench.report import BenchReport, StepResult
from framecast_bench.stats import Recorder, step_result


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_step(
    concurrency: int = 4,
    latency_ms: float = 10.0,
    requests: int = 100,
    window_s: float = 1.0,
    windows: int = 3,
    errors: dict[str, int] | None = None,
) -> StepResult:
    """A closed-loop step whose windows each saw ``requests`` of ``latency_ms`` (split 1/2/3/4)."""
    clock = FakeClock()
    rec = Recorder(clock)
    done = []
    for _ in range(windows):
        for i in range(requests):
            total = latency_ms * (1.0 + 0.01 * (i % 10))
            rec.record_success(
                total_ms=total,
                client_wait_ms=0.0,
                server_queue_ms=0.2 * latency_ms,
                server_compute_ms=0.5 * latency_ms,
                images=2,
                preprocess_ms=1.5,
            )
        for code, n in (errors or {}).items():
            for _ in range(n):
                rec.record_error(code)
        clock.now += window_s
        rec.rotate()
        done.extend(rec.take_closed())
    return step_result(done, used=3, stable=True, loop="closed", concurrency=concurrency)


def make_report(scale: float = 1.0, concurrencies: tuple[int, ...] = (1, 4)) -> BenchReport:
    """A report with one step per concurrency; latencies scaled by ``scale``."""
    return BenchReport(
        meta={"address": "localhost:1", "mode": "unary", "loop": "closed", "batch_size": 1},
        steps=[make_step(c, latency_ms=2.0 * c * scale, requests=50 * c) for c in concurrencies],
    )


@pytest.fixture
def step_factory() -> Callable[..., StepResult]:
    """:func:`make_step`."""
    return make_step


@pytest.fixture
def report_factory() -> Callable[..., BenchReport]:
    """:func:`make_report`."""
    return make_report
