"""The streams a server runs now: their options, what ListStreams reports, the rate each may send.

Everything here runs on the server's event loop (no locks). A stream's figures are bounded:
its name and caller are cut to :data:`NAME_LIMIT` characters, its percentiles come from its
last :data:`RECENT` frames, and a listing holds at most :data:`LIST_LIMIT` streams.

The rate hint (``FlowHint.rate_fps``) is the backend's measured capacity shared equally among
the open streams. Capacity is measured from busy time, images computed per second of backend
time (times the batches it runs at once), not from throughput: an idle server's throughput is
its load, which would cap every client at what it sends now, while its busy-time rate is
always at least the load.
"""

from __future__ import annotations

import collections
import itertools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from framecast_client.wire_format import WireFormatError

__all__ = [
    "LIST_LIMIT",
    "NAME_LIMIT",
    "CapacityMeter",
    "StreamEntry",
    "StreamRegistry",
    "printable",
    "stream_options",
]

NAME_LIMIT = 64
# Stream options, as call metadata (see ClassifyStream in classifier.proto).
STREAM_NAME_KEY = "framecast-stream-name"
MAX_AGE_KEY = "framecast-max-age-ms"
MAX_AGE_LIMIT_MS = 3_600_000
LIST_LIMIT = 1000
RECENT = 256
# How often rates and the capacity are brought up to date, seconds.
WINDOW_S = 1.0
# Frames a capacity window needs before its figure replaces the last one.
_MIN_SAMPLES = 4
# The share of the capacity the hints hand out: at a utilization of 1 a queue never drains, so
# frames paced exactly at capacity would still wait ever longer.
HEADROOM = 0.9
# Without a max age, the hint's window keeps a stream's frames within this wait.
DEFAULT_BUDGET_S = 0.1


def printable(text: str) -> str:
    """``text`` cut to NAME_LIMIT characters, control characters replaced (it reaches terminals)."""
    return "".join(c if c.isprintable() else "?" for c in text[:NAME_LIMIT])


def stream_options(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, int]:
    """A stream's name and max age (ms, 0: none) from its call's metadata.

    Raises WireFormatError for a max age that is not an integer in range.
    """
    name, max_age_ms = "", 0
    for key, value in metadata:
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
        if key == STREAM_NAME_KEY:
            name = printable(text)
        elif key == MAX_AGE_KEY:
            try:
                max_age_ms = int(text)
            except ValueError:
                max_age_ms = -1
            if not 0 <= max_age_ms <= MAX_AGE_LIMIT_MS:
                raise WireFormatError(
                    f"{MAX_AGE_KEY} must be an integer from 0 to {MAX_AGE_LIMIT_MS}, got {text!r}"
                )
    return name, max_age_ms


def _p99(values: collections.deque[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class CapacityMeter:
    """Images per second the backend computes when busy, over the last window."""

    def __init__(self, concurrency: int = 1) -> None:
        self._concurrency = max(1, concurrency)
        self._images = 0
        self._busy_us = 0.0
        self._since = time.monotonic()
        self.fps = 0.0

    def computed(self, compute_us: int, batch_size: int) -> None:
        """One image ran in a batch of ``batch_size`` that took ``compute_us``."""
        self._images += 1
        self._busy_us += compute_us / max(1, batch_size)
        now = time.monotonic()
        if now - self._since >= WINDOW_S and self._images >= _MIN_SAMPLES:
            # Per-image busy time is at least 1 µs: a backend faster than the clock's
            # resolution still yields a finite figure.
            busy_s = max(self._busy_us, float(self._images)) / 1e6
            self.fps = self._images / busy_s * self._concurrency
            self._images, self._busy_us, self._since = 0, 0.0, now


@dataclass(slots=True)
class StreamEntry:
    """One open stream's identity and counters."""

    id: int
    caller: str
    name: str
    max_age_ms: int
    started_unix_ms: int
    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    rate_hint_fps: float = 0.0
    latencies_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT)
    )
    ages_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT)
    )
    # Rates: counts since window_start, and the rates of the last whole window.
    window_start: float = field(default_factory=time.monotonic)
    window_in: int = 0
    window_out: int = 0
    rate_in: float = 0.0
    rate_out: float = 0.0

    def _roll(self, now: float) -> None:
        elapsed = now - self.window_start
        if elapsed >= WINDOW_S:
            self.rate_in, self.rate_out = self.window_in / elapsed, self.window_out / elapsed
            self.window_in = self.window_out = 0
            self.window_start = now

    def received(self) -> None:
        """A frame arrived."""
        self._roll(time.monotonic())
        self.frames_in += 1
        self.window_in += 1

    def answered(self, latency_ms: float, age_ms: float | None, *, ok: bool) -> None:
        """A frame was answered (``ok``: classified), ``latency_ms`` after it arrived."""
        self._roll(time.monotonic())
        self.frames_out += 1
        self.window_out += 1
        self.latencies_ms.append(latency_ms)
        if age_ms is not None:
            self.ages_ms.append(age_ms)
        if not ok:
            self.dropped += 1

    def rates(self) -> tuple[float, float]:
        """Frames in and out per second, over the last whole window (0 once it went quiet)."""
        now = time.monotonic()
        if now - self.window_start >= 2 * WINDOW_S:
            elapsed = now - self.window_start
            return self.window_in / elapsed, self.window_out / elapsed
        return self.rate_in, self.rate_out

    def p99_latency_ms(self) -> float:
        return _p99(self.latencies_ms)

    def p99_age_ms(self) -> float:
        return _p99(self.ages_ms)


class StreamRegistry:
    """The open streams of one servicer, and the capacity they share."""

    def __init__(self) -> None:
        self._streams: dict[int, StreamEntry] = {}
        self._ids = itertools.count(1)
        self.capacity = CapacityMeter()

    def set_concurrency(self, concurrency: int) -> None:
        """The backend runs this many batches at once (its busy times overlap)."""
        self.capacity = CapacityMeter(concurrency)

    def open(self, caller: str, name: str, max_age_ms: int) -> StreamEntry:
        """Register a stream that just started."""
        entry = StreamEntry(
            id=next(self._ids),
            caller=caller[:NAME_LIMIT],
            name=name[:NAME_LIMIT],
            max_age_ms=max_age_ms,
            started_unix_ms=time.time_ns() // 1_000_000,
        )
        self._streams[entry.id] = entry
        return entry

    def close(self, entry: StreamEntry) -> None:
        """The stream ended."""
        self._streams.pop(entry.id, None)

    def hint(self, max_age_ms: int) -> tuple[float, int]:
        """A stream's rate hint and window: (fps, frames in flight); (0, 0) until measured.

        The rate is an equal share of the measured capacity, less :data:`HEADROOM`; the window
        is what that rate computes within half the stream's max age (queue wait and the
        client's own delay share the other half), at least one frame.
        """
        rate = HEADROOM * self.capacity.fps / max(1, len(self._streams))
        if rate <= 0:
            return 0.0, 0
        budget_s = max_age_ms / 2000 if max_age_ms else DEFAULT_BUDGET_S
        return rate, max(1, min(1 << 16, int(rate * budget_s)))

    def listing(self) -> tuple[list[StreamEntry], int]:
        """The oldest :data:`LIST_LIMIT` streams, and how many more there are."""
        streams = sorted(self._streams.values(), key=lambda e: e.id)
        return streams[:LIST_LIMIT], max(0, len(streams) - LIST_LIMIT)
