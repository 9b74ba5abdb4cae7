"""The open-loop arrival schedule: a Poisson process of the asked rate, bounded."""

from __future__ import annotations

import math

import numpy as np
import pytest
from framecast_bench.schedule import constant_schedule, poisson_schedule
from numpy.typing import NDArray


def ks_statistic_exponential(gaps: NDArray[np.float64], rate: float) -> float:
    """Kolmogorov-Smirnov D of the gaps against Exp(rate)."""
    x = np.sort(gaps)
    n = x.size
    cdf = 1.0 - np.exp(-rate * x)
    upper = np.arange(1, n + 1) / n - cdf
    lower = cdf - np.arange(0, n) / n
    return float(max(upper.max(), lower.max()))


def ks_critical(n: int) -> float:
    # 1 % significance, large-n asymptotic.
    return 1.63 / math.sqrt(n)


RATE = 250.0


@pytest.fixture(scope="module")
def schedule() -> NDArray[np.float64]:
    return poisson_schedule(RATE, 400.0, 1_000_000, np.random.default_rng(2024))


def test_mean_rate(schedule: NDArray[np.float64]) -> None:
    # 100k arrivals: the count's standard deviation is ~0.3 %.
    assert schedule.size == pytest.approx(RATE * 400.0, rel=0.02)
    gaps = np.diff(schedule, prepend=0.0)
    assert gaps.mean() == pytest.approx(1.0 / RATE, rel=0.02)


def test_exponential_inter_arrivals(schedule: NDArray[np.float64]) -> None:
    gaps = np.diff(schedule, prepend=0.0)
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1.0, abs=0.02)
    assert ks_statistic_exponential(gaps, RATE) < ks_critical(gaps.size)


def test_counts_per_second_are_poisson(schedule: NDArray[np.float64]) -> None:
    # Counts in 1 s bins: Poisson, so variance / mean (index of dispersion) is about 1.
    counts = np.bincount(schedule.astype(np.int64))[:400]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.2)


def test_the_checks_reject_a_non_poisson_process() -> None:
    # The same checks fail for evenly spaced arrivals at the same rate: they can fail.
    even = constant_schedule(RATE, 400.0, 1_000_000)
    gaps = np.diff(even, prepend=0.0)
    assert gaps.std() / gaps.mean() < 0.01
    assert ks_statistic_exponential(gaps, RATE) > ks_critical(gaps.size)


def test_bounded_in_time_and_count() -> None:
    rng = np.random.default_rng(1)
    by_time = poisson_schedule(100.0, 2.0, 10_000, rng)
    assert by_time.size > 0
    assert by_time[-1] <= 2.0
    assert np.all(np.diff(by_time) >= 0.0)
    assert by_time[0] > 0.0
    by_count = poisson_schedule(100.0, 3600.0, 50, rng)
    assert by_count.size == 50


def test_seeded_schedules_repeat() -> None:
    a = poisson_schedule(50.0, 10.0, 1000, np.random.default_rng(3))
    b = poisson_schedule(50.0, 10.0, 1000, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_constant_schedule_spacing() -> None:
    s = constant_schedule(20.0, 1.0, 100)
    np.testing.assert_allclose(np.diff(s), 0.05)
    assert s.size == 20


@pytest.mark.parametrize(
    ("rate", "duration", "count"), [(0.0, 1.0, 1), (1.0, 0.0, 1), (1.0, 1.0, 0)]
)
def test_bad_arguments(rate: float, duration: float, count: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        poisson_schedule(rate, duration, count, np.random.default_rng(0))
