"""LogHistogram: percentiles within its stated relative error, merging, constant memory."""

from __future__ import annotations

import math

import numpy as np
import pytest
from framecast_client.histogram import LogHistogram
from numpy.typing import NDArray

QS = (1.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9)
# Floating point at a bucket edge can add a hair to the bound.
SLACK = 1e-9


def exact(samples: NDArray[np.float64], q: float) -> float:
    # The order statistic of rank ceil(q/100 * n): the definition the histogram answers.
    return float(np.percentile(samples, q, method="inverted_cdf"))


def assert_within_error(h: LogHistogram, samples: NDArray[np.float64]) -> None:
    for q in QS:
        want = exact(samples, q)
        got = h.percentile(q)
        assert abs(got - want) <= (h.relative_error + SLACK) * want, (q, got, want)


@pytest.mark.parametrize(
    "draw",
    [
        pytest.param(lambda rng, n: rng.uniform(0.5, 200.0, n), id="uniform"),
        pytest.param(lambda rng, n: rng.exponential(5.0, n), id="exponential"),
        pytest.param(lambda rng, n: rng.lognormal(1.0, 1.5, n), id="lognormal-heavy-tail"),
    ],
)
@pytest.mark.parametrize("relative_error", [0.01, 0.05])
def test_percentiles_within_stated_relative_error(draw, relative_error: float) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1234)
    samples = draw(rng, 50_000)
    h = LogHistogram(relative_error=relative_error)
    h.record_many(samples)
    assert_within_error(h, samples)
    assert h.count == samples.size
    assert h.mean == pytest.approx(samples.mean(), rel=1e-12)
    assert h.max == samples.max()
    assert h.min == samples.min()
    assert h.percentile(100.0) == samples.max()
    assert h.percentile(0.0) == samples.min()


def test_error_is_not_trivially_zero() -> None:
    # Guard on the test above: the histogram does approximate (it is not storing samples),
    # yet within the bound.
    rng = np.random.default_rng(7)
    samples = rng.uniform(1.0, 100.0, 20_000)
    h = LogHistogram(relative_error=0.05)
    h.record_many(samples)
    errors = [abs(h.percentile(q) - exact(samples, q)) / exact(samples, q) for q in QS]
    assert max(errors) > 0.001
    assert max(errors) <= 0.05 + SLACK


def test_constant_distribution_is_exact() -> None:
    h = LogHistogram()
    for _ in range(1000):
        h.record(7.25)
    assert {h.percentile(q) for q in QS} == {7.25}
    assert h.mean == pytest.approx(7.25)


def test_record_and_record_many_agree() -> None:
    rng = np.random.default_rng(3)
    samples = rng.exponential(2.0, 5000)
    one, many = LogHistogram(), LogHistogram()
    for x in samples:
        one.record(float(x))
    many.record_many(samples)
    assert one.to_dict()["buckets"] == many.to_dict()["buckets"]


def test_merge_equals_recording_everything_in_one() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.exponential(3.0, 10_000), rng.uniform(10.0, 50.0, 7_000)
    ha, hb, whole = LogHistogram(), LogHistogram(), LogHistogram()
    ha.record_many(a)
    hb.record_many(b)
    whole.record_many(np.concatenate([a, b]))
    merged = LogHistogram.merged([ha, hb], LogHistogram())
    assert merged.to_dict()["buckets"] == whole.to_dict()["buckets"]
    assert merged.count == whole.count == 17_000
    assert merged.percentiles(QS) == whole.percentiles(QS)
    assert merged.min == whole.min
    assert merged.max == whole.max
    # The parts are untouched by merged().
    assert ha.count == 10_000


def test_merge_rejects_different_parameters() -> None:
    with pytest.raises(ValueError, match="different parameters"):
        LogHistogram(relative_error=0.01).merge(LogHistogram(relative_error=0.02))


def test_memory_is_constant_and_out_of_range_values_are_clamped() -> None:
    h = LogHistogram(lowest=1e-3, highest=1e3)
    size = h.n_buckets
    h.record_many(np.random.default_rng(0).exponential(1.0, 200_000))
    h.record(1e9)  # beyond highest: last bucket, exact max kept
    h.record(1e-9)  # below lowest: first bucket
    h.record(-1.0)  # a stepped clock: clamped to 0
    assert h.n_buckets == size
    assert h.percentile(100.0) == 1e9
    assert h.percentile(0.0) == 0.0
    # ~1 % buckets over 6 decades: about 700, a few kB, whatever the number of samples.
    assert 600 < size < 800


def test_empty_histogram_answers_nan() -> None:
    h = LogHistogram()
    assert math.isnan(h.percentile(50.0))
    assert math.isnan(h.mean)


def test_dict_round_trip() -> None:
    h = LogHistogram()
    h.record_many(np.random.default_rng(9).exponential(4.0, 3000))
    back = LogHistogram.from_dict(h.to_dict())
    assert back.percentiles(QS) == h.percentiles(QS)
    assert (back.count, back.sum, back.min, back.max) == (h.count, h.sum, h.min, h.max)
    assert LogHistogram.from_dict(LogHistogram().to_dict()).count == 0


def test_dict_with_inconsistent_counts_is_rejected() -> None:
    data = LogHistogram().to_dict()
    data["count"] = 3
    with pytest.raises(ValueError, match="add up"):
        LogHistogram.from_dict(data)


@pytest.mark.parametrize("q", [-1.0, 100.5])
def test_percentile_out_of_range(q: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        LogHistogram().percentile(q)
