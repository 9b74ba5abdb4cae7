"""Recording one load step: measurement windows, the stability criterion, the step's result."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from framecast_client.histogram import LogHistogram

from framecast_bench.report import (
    SPLIT_COMPONENTS,
    StepResult,
    WindowResult,
    latency_summary,
    short_summary,
)


@dataclass
class Window:
    """Everything recorded during one measurement window (latencies in ms)."""

    start: float
    end: float = math.nan
    requests: int = 0
    images: int = 0
    untimed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    total: LogHistogram = field(default_factory=LogHistogram)
    preprocess: LogHistogram = field(default_factory=LogHistogram)
    split: dict[str, LogHistogram] = field(
        default_factory=lambda: {c: LogHistogram() for c in SPLIT_COMPONENTS}
    )
    # Outcomes not yet in the histograms: (total, client_wait, queue, compute, preprocess) in
    # ms, NaN queue/compute without server timing. A short staging buffer, emptied by
    # flush() every controller poll and at the window's end, so a worker's bookkeeping
    # between two requests is one append (time a worker spends there is load it does not
    # offer) and memory stays bounded by the poll interval and the window cap.
    pending: list[tuple[float, float, float, float, float]] = field(default_factory=list)

    def flush(self) -> None:
        """Move the staged outcomes into the histograms (vectorized)."""
        if not self.pending:
            return
        data = np.asarray(self.pending, dtype=np.float64)
        self.pending = []
        total, wait, queue, compute, preprocess = data.T
        self.total.record_many(total)
        self.preprocess.record_many(preprocess)
        timed = ~(np.isnan(queue) | np.isnan(compute))
        self.untimed += int((~timed).sum())
        if timed.any():
            total, wait, queue, compute = total[timed], wait[timed], queue[timed], compute[timed]
            self.split["client_wait"].record_many(wait)
            self.split["server_queue"].record_many(queue)
            self.split["server_compute"].record_many(compute)
            # What the server did not account for: the wire, (de)serialization, gRPC and
            # Python on both ends. The histogram clamps it at 0: server times are rounded
            # to whole microseconds.
            self.split["network"].record_many(total - wait - queue - compute)

    @property
    def duration_s(self) -> float:
        """Length of the window (NaN while it is open)."""
        return self.end - self.start

    @property
    def throughput_rps(self) -> float:
        """Successful requests per second over the window."""
        d = self.duration_s
        return self.requests / d if d > 0 else math.nan

    def result(self) -> WindowResult:
        """The window's summary as it goes into the report."""
        self.flush()
        return WindowResult(
            duration_s=self.duration_s,
            requests=self.requests,
            errors=sum(self.errors.values()),
            throughput_rps=self.throughput_rps,
            p99_ms=self.total.percentile(99.0),
        )


class Recorder:
    """Thread-safe sink for request outcomes, cut into windows.

    Workers record into the current window; a request belongs to the window in which it
    completed. A window closes when the controller calls :meth:`rotate` (its time is up) or
    by itself when it holds ``window_cap`` outcomes, so no window exceeds the cap. Closed
    windows queue up until the controller takes them with :meth:`take_closed`.
    """

    def __init__(
        self, clock: Callable[[], float] = time.perf_counter, window_cap: int | None = None
    ) -> None:
        if window_cap is not None and window_cap < 1:
            raise ValueError(f"window_cap must be >= 1, got {window_cap}")
        self._clock = clock
        self._cap = window_cap
        self._lock = threading.Lock()
        self._current = Window(start=clock())
        self._closed: list[Window] = []
        #: Set whenever a window closes by reaching its cap.
        self.window_closed = threading.Event()

    def _outcomes(self) -> int:
        return self._current.requests + sum(self._current.errors.values())

    def _close_locked(self) -> Window:
        now = self._clock()
        closed = self._current
        closed.end = now
        self._closed.append(closed)
        self._current = Window(start=now)
        return closed

    def _after_record_locked(self) -> None:
        if self._cap is not None and self._outcomes() >= self._cap:
            self._close_locked()
            self.window_closed.set()

    def record_success(
        self,
        *,
        total_ms: float,
        client_wait_ms: float,
        server_queue_ms: float | None,
        server_compute_ms: float | None,
        images: int,
        preprocess_ms: float,
    ) -> None:
        """Record a request that succeeded.

        ``total_ms`` runs from when the request was due to its response; ``client_wait_ms``
        is the part of it spent before the request left (open loop, all workers busy). With
        no server timing the request counts in the total but not in the split.
        """
        with self._lock:
            w = self._current
            w.requests += 1
            w.images += images
            w.pending.append(
                (
                    total_ms,
                    client_wait_ms,
                    math.nan if server_queue_ms is None else server_queue_ms,
                    math.nan if server_compute_ms is None else server_compute_ms,
                    preprocess_ms,
                )
            )
            self._after_record_locked()

    def record_error(self, code: str) -> None:
        """Record a failed request by its status code name (or exception type)."""
        with self._lock:
            self._current.errors[code] += 1
            self._after_record_locked()

    def flush(self) -> None:
        """Move the open window's staged outcomes into its histograms."""
        with self._lock:
            self._current.flush()

    def current_start(self) -> float:
        """When the open window started."""
        with self._lock:
            return self._current.start

    def rotate(self, started: float | None = None) -> None:
        """Close the open window (queued for :meth:`take_closed`) and open the next one.

        With ``started``, only if the open window is the one that started then: a window
        that just closed by its cap is not followed by an empty sliver.
        """
        with self._lock:
            if started is None or self._current.start == started:
                self._close_locked()

    def take_closed(self) -> list[Window]:
        """The windows closed since the last call, oldest first."""
        with self._lock:
            closed, self._closed = self._closed, []
            self.window_closed.clear()
        for w in closed:  # closed: no worker writes to them any more
            w.flush()
        return closed


def is_stable(windows: Sequence[WindowResult], count: int, tolerance: float) -> bool:
    """perf_analyzer's criterion: the last ``count`` windows' throughput and p99 agree.

    Stable when, over the last ``count`` windows, every throughput and every p99 is within
    ``±tolerance`` of that metric's mean over those windows, and each window completed
    requests.
    """
    if count < 1 or len(windows) < count:
        return False
    last = windows[-count:]
    if any(w.requests == 0 or math.isnan(w.p99_ms) for w in last):
        return False
    for values in ([w.throughput_rps for w in last], [w.p99_ms for w in last]):
        mean = sum(values) / len(values)
        if mean <= 0 or any(abs(v - mean) > tolerance * mean for v in values):
            return False
    return True


def step_result(
    windows: Sequence[Window],
    *,
    used: int,
    stable: bool,
    loop: str,
    concurrency: int | None = None,
    target_rate_rps: float | None = None,
) -> StepResult:
    """Summarize a step from the last ``used`` of its windows (merged; all kept in the log)."""
    chosen = list(windows[-used:]) if used > 0 else list(windows)
    total = LogHistogram.merged((w.total for w in chosen), LogHistogram())
    preprocess = LogHistogram.merged((w.preprocess for w in chosen), LogHistogram())
    split = {
        c: LogHistogram.merged((w.split[c] for w in chosen), LogHistogram())
        for c in SPLIT_COMPONENTS
    }
    errors: Counter[str] = Counter()
    for w in chosen:
        errors.update(w.errors)
    duration = sum(w.duration_s for w in chosen)
    requests = sum(w.requests for w in chosen)
    images = sum(w.images for w in chosen)
    return StepResult(
        loop=loop,
        concurrency=concurrency,
        target_rate_rps=target_rate_rps,
        duration_s=duration,
        requests=requests,
        images=images,
        throughput_rps=requests / duration if duration > 0 else math.nan,
        throughput_ips=images / duration if duration > 0 else math.nan,
        latency_ms=latency_summary(total),
        split_ms={c: short_summary(h) for c, h in split.items()},
        preprocess_ms=short_summary(preprocess),
        errors=dict(errors),
        stable=stable,
        windows=[w.result() for w in windows],
        untimed_requests=sum(w.untimed for w in chosen),
        histogram=total.to_dict(),
    )
