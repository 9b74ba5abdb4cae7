"""Open-loop arrival schedules, fixed in advance.

An open-loop step sends request ``i`` at ``start + schedule[i]`` whether or not earlier
requests have come back, and measures its latency from that *scheduled* time. A closed-loop
generator (or an open-loop one that measures from the actual send) waits for the server when
it is slow and so never observes the queueing a real arrival process would have caused
("coordinated omission"); fixing the schedule up front makes that impossible.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def poisson_schedule(
    rate: float,
    duration_s: float,
    max_count: int,
    rng: np.random.Generator,
) -> NDArray[np.float64]:
    """Send offsets in seconds of a Poisson process of ``rate`` per second.

    Inter-arrival times are independent exponentials of mean ``1/rate``. The schedule stops
    at ``duration_s`` or after ``max_count`` arrivals, whichever comes first, so its length is
    bounded in both time and count. Offsets are sorted and start after 0.
    """
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if duration_s <= 0 or max_count <= 0:
        raise ValueError("duration_s and max_count must be positive")
    # Draw a little more than the expected count so one draw almost always covers the
    # duration; extend in the rare case it does not.
    expected = rate * duration_s
    n = min(max_count, int(expected + 6.0 * np.sqrt(expected) + 16))
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=n))
    while offsets[-1] < duration_s and offsets.size < max_count:
        more = np.cumsum(rng.exponential(1.0 / rate, size=min(n, max_count - offsets.size)))
        offsets = np.concatenate([offsets, offsets[-1] + more])
    return offsets[offsets <= duration_s][:max_count]


def constant_schedule(rate: float, duration_s: float, max_count: int) -> NDArray[np.float64]:
    """Evenly spaced send offsets at ``rate`` per second (a deterministic arrival process)."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if duration_s <= 0 or max_count <= 0:
        raise ValueError("duration_s and max_count must be positive")
    n = min(max_count, int(rate * duration_s))
    return np.arange(1, n + 1, dtype=np.float64) / rate
