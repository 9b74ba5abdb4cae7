"""A log-bucketed latency histogram with bounded relative error (HDR/DDSketch-like).

The one histogram of the SDK: streaming sessions keep their latency percentiles in it, and the
benchmark tool (``framecast_bench``, its own distribution) its per-window and per-step
latencies.

Every recorded value lands in a bucket ``(g^(i-1), g^i]`` (in units of ``lowest``) with
``g = (1 + a) / (1 - a)``; a percentile is answered with the bucket's point
``2·g^i / (g + 1)``, which is within a relative error ``a`` of every value in the bucket. So the
answer for a percentile is within ``a`` of the exact order statistic (the value of rank
``ceil(q·n)``), whatever the distribution, in constant memory: the bucket array is sized once
from ``lowest``, ``highest`` and ``a``. Histograms with the same parameters merge by adding
counts, so per-window histograms combine into a per-step one without keeping samples.

Values below ``lowest`` count in the first bucket and values above ``highest`` in the last;
the exact minimum, maximum, sum and count are kept on the side, and percentile answers are
clamped to ``[min, max]`` (which makes a constant distribution exact).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

DEFAULT_RELATIVE_ERROR = 0.01
#: Default range in milliseconds: 1 µs to 1000 s.
DEFAULT_LOWEST = 1e-3
DEFAULT_HIGHEST = 1e6


class LogHistogram:
    """Counts of values in log-spaced buckets; percentiles within ``relative_error``.

    Not thread-safe: callers that record from several threads hold a lock, or keep one
    histogram per thread and :meth:`merge` them.
    """

    __slots__ = (
        "_counts",
        "_gamma",
        "_log_gamma",
        "count",
        "highest",
        "lowest",
        "max",
        "min",
        "relative_error",
        "sum",
    )

    def __init__(
        self,
        relative_error: float = DEFAULT_RELATIVE_ERROR,
        lowest: float = DEFAULT_LOWEST,
        highest: float = DEFAULT_HIGHEST,
    ) -> None:
        if not 0.0 < relative_error < 1.0:
            raise ValueError(f"relative_error must be in (0, 1), got {relative_error}")
        if not 0.0 < lowest < highest:
            raise ValueError(f"need 0 < lowest < highest, got {lowest}, {highest}")
        self.relative_error = relative_error
        self.lowest = lowest
        self.highest = highest
        self._gamma = (1.0 + relative_error) / (1.0 - relative_error)
        self._log_gamma = math.log(self._gamma)
        # Bucket 0 holds (.., lowest]; bucket i holds (lowest·g^(i-1), lowest·g^i].
        n_buckets = math.ceil(math.log(highest / lowest) / self._log_gamma) + 1
        self._counts: NDArray[np.int64] = np.zeros(n_buckets, dtype=np.int64)
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    @property
    def n_buckets(self) -> int:
        """Number of buckets: fixed at construction, whatever is recorded."""
        return int(self._counts.size)

    def _index(self, value: float) -> int:
        if value <= self.lowest:
            return 0
        i = math.ceil(math.log(value / self.lowest) / self._log_gamma)
        return min(i, self._counts.size - 1)

    def _bucket_value(self, index: int) -> float:
        # The point within relative_error of every value in (g^(i-1), g^i].
        return self.lowest * 2.0 * self._gamma**index / (self._gamma + 1.0)

    def record(self, value: float) -> None:
        """Count one value (negative values are clamped to 0: clocks may step)."""
        value = max(value, 0.0)
        self._counts[self._index(value)] += 1
        self.count += 1
        self.sum += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def record_many(self, values: Iterable[float] | NDArray[np.floating[Any]]) -> None:
        """Count many values at once (vectorized)."""
        arr = np.maximum(np.asarray(values, dtype=np.float64).ravel(), 0.0)
        if arr.size == 0:
            return
        with np.errstate(divide="ignore"):
            idx = np.ceil(np.log(np.maximum(arr, self.lowest) / self.lowest) / self._log_gamma)
        idx = np.clip(idx, 0, self._counts.size - 1).astype(np.int64)
        self._counts += np.bincount(idx, minlength=self._counts.size)
        self.count += int(arr.size)
        self.sum += float(arr.sum())
        self.min = min(self.min, float(arr.min()))
        self.max = max(self.max, float(arr.max()))

    def _check_compatible(self, other: LogHistogram) -> None:
        if (other.relative_error, other.lowest, other.highest) != (
            self.relative_error,
            self.lowest,
            self.highest,
        ):
            raise ValueError("cannot merge histograms with different parameters")

    def merge(self, other: LogHistogram) -> None:
        """Add ``other``'s counts into this histogram (same parameters required)."""
        self._check_compatible(other)
        self._counts += other._counts
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def copy(self) -> LogHistogram:
        """An independent copy."""
        new = LogHistogram(self.relative_error, self.lowest, self.highest)
        new.merge(self)
        return new

    @classmethod
    def merged(cls, histograms: Iterable[LogHistogram], template: LogHistogram) -> LogHistogram:
        """A new histogram holding all of ``histograms``, parameters from ``template``."""
        out = cls(template.relative_error, template.lowest, template.highest)
        for h in histograms:
            out.merge(h)
        return out

    @property
    def mean(self) -> float:
        """Exact mean of the recorded values (NaN when empty)."""
        return self.sum / self.count if self.count else math.nan

    def percentile(self, q: float) -> float:
        """The value of rank ``ceil(q/100 · count)``, within ``relative_error`` (NaN when empty).

        ``q`` is in [0, 100]; 0 gives the minimum and 100 the maximum, exactly.
        """
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {q}")
        if self.count == 0:
            return math.nan
        if q == 0.0:
            return self.min
        if q == 100.0:
            return self.max
        rank = max(1, math.ceil(q / 100.0 * self.count))
        cumulative = np.cumsum(self._counts)
        index = int(np.searchsorted(cumulative, rank, side="left"))
        return min(max(self._bucket_value(index), self.min), self.max)

    def percentiles(self, qs: Iterable[float]) -> dict[float, float]:
        """:meth:`percentile` for several ``qs`` at once."""
        return {q: self.percentile(q) for q in qs}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able sparse form; :meth:`from_dict` restores it exactly."""
        nonzero = np.flatnonzero(self._counts)
        return {
            "relative_error": self.relative_error,
            "lowest": self.lowest,
            "highest": self.highest,
            "count": self.count,
            "sum": self.sum,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "buckets": [[int(i), int(self._counts[i])] for i in nonzero],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LogHistogram:
        """Rebuild a histogram written by :meth:`to_dict`."""
        h = cls(float(data["relative_error"]), float(data["lowest"]), float(data["highest"]))
        for index, n in data["buckets"]:
            h._counts[int(index)] = int(n)
        h.count = int(data["count"])
        h.sum = float(data["sum"])
        if int(h._counts.sum()) != h.count:
            raise ValueError("histogram buckets do not add up to its count")
        if h.count:
            h.min = float(data["min"])
            h.max = float(data["max"])
        return h
