"""Recording a camera-fleet step: per-camera tallies cut into windows, and the step's result.

Every frame a camera captures ends as one of: answered (a classification), dropped on the
client (never sent: replaced by a newer frame, skipped at capture on the server's rate hint,
the stream's in-flight window full, lost on a broken connection), dropped on the server (an
error answer, by reason: ``stale_at_admission``, ``stale_at_compute``, or a status code), or
still in flight. An answered frame whose end-to-end latency exceeds the step's max age is also
counted ``expired``: answered, but too late to be of use. An outcome belongs to the window in
which it happened; the captures of a window are counted in it as well.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from framecast_bench.report import WindowResult


@dataclass
class CameraTally:
    """One camera's outcomes in one window (times in ms)."""

    captured: int = 0
    answered: int = 0
    dropped_client: int = 0
    dropped_server: Counter[str] = field(default_factory=Counter)
    expired: int = 0
    latency_ms: list[float] = field(default_factory=list)
    age_ms: list[float] = field(default_factory=list)  # answers that stated an age
    late_ms: list[float] = field(default_factory=list)  # how late each capture was taken

    def drops(self) -> int:
        """Frames without a useful answer: dropped anywhere, or answered too late."""
        return self.dropped_client + sum(self.dropped_server.values()) + self.expired


@dataclass
class FleetWindow:
    """Every camera's tally over one measurement window."""

    start: float
    cameras: list[CameraTally]
    end: float = math.nan

    @property
    def duration_s(self) -> float:
        return self.end - self.start

    def result(self) -> WindowResult:
        """What the stability criterion looks at: frames answered per second and p99."""
        answered = sum(c.answered for c in self.cameras)
        latencies = [x for c in self.cameras for x in c.latency_ms]
        d = self.duration_s
        return WindowResult(
            duration_s=d,
            requests=answered,
            errors=sum(c.drops() for c in self.cameras),
            throughput_rps=answered / d if d > 0 else math.nan,
            p99_ms=float(np.percentile(latencies, 99)) if latencies else math.nan,
        )


class FleetRecorder:
    """Thread-safe sink of the cameras' outcomes; :meth:`rotate` closes the current window."""

    def __init__(
        self, cameras: int, max_age_ms: float | None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._n = cameras
        self._max_age_ms = max_age_ms
        self._clock = clock
        self._lock = threading.Lock()
        self._window = self._new(clock())
        #: Cameras whose stream ended with an error, by code, over the whole step.
        self.stream_errors: Counter[str] = Counter()

    def _new(self, start: float) -> FleetWindow:
        return FleetWindow(start=start, cameras=[CameraTally() for _ in range(self._n)])

    def captured(self, camera: int, late_ms: float) -> None:
        with self._lock:
            tally = self._window.cameras[camera]
            tally.captured += 1
            tally.late_ms.append(late_ms)

    def answered(self, camera: int, latency_ms: float, age_ms: float | None) -> None:
        with self._lock:
            tally = self._window.cameras[camera]
            tally.answered += 1
            tally.latency_ms.append(latency_ms)
            if age_ms is not None:
                tally.age_ms.append(age_ms)
            if self._max_age_ms is not None and latency_ms > self._max_age_ms:
                tally.expired += 1

    def dropped_client(self, camera: int, count: int = 1) -> None:
        if count:
            with self._lock:
                self._window.cameras[camera].dropped_client += count

    def dropped_server(self, camera: int, reason: str) -> None:
        with self._lock:
            self._window.cameras[camera].dropped_server[reason] += 1

    def stream_error(self, code: str) -> None:
        """A camera's stream ended with an error (the camera is gone for the step)."""
        with self._lock:
            self.stream_errors[code] += 1

    def rotate(self) -> FleetWindow:
        """Close the current window and open the next one; returns the closed one."""
        with self._lock:
            now = self._clock()
            closed, self._window = self._window, self._new(now)
        closed.end = now
        return closed


def _percentiles(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    p50, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 99])
    return {"p50": float(p50), "p99": float(p99)}


def _per_camera(tally: CameraTally, duration_s: float) -> dict[str, Any]:
    latency = _percentiles(tally.latency_ms)
    age = _percentiles(tally.age_ms)
    return {
        "answered_fps": tally.answered / duration_s if duration_s > 0 else math.nan,
        # At most 100: a camera's drops are counted when they happen, and a frame captured at
        # the end of the window before may be dropped in this one.
        "drop_pct": min(100.0, 100.0 * tally.drops() / tally.captured)
        if tally.captured
        else math.nan,
        "latency_p50_ms": latency["p50"] if latency else math.nan,
        "latency_p99_ms": latency["p99"] if latency else math.nan,
        "age_p50_ms": age["p50"] if age else None,
        "age_p99_ms": age["p99"] if age else None,
    }


def _worst(cameras: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the worst camera's value (fewest answers, most drops, slowest, oldest)."""

    def pick(key: str, chooser: Callable[[list[float]], float]) -> float | None:
        values = [c[key] for c in cameras if c[key] is not None and not math.isnan(c[key])]
        return chooser(values) if values else None

    return {
        "answered_fps": pick("answered_fps", min),
        "drop_pct": pick("drop_pct", max),
        "latency_p50_ms": pick("latency_p50_ms", max),
        "latency_p99_ms": pick("latency_p99_ms", max),
        "age_p50_ms": pick("age_p50_ms", max),
        "age_p99_ms": pick("age_p99_ms", max),
    }


def merge_windows(windows: Sequence[FleetWindow]) -> FleetWindow:
    """The windows' tallies added up camera by camera (one window spanning them)."""
    merged = FleetWindow(
        start=windows[0].start,
        end=windows[-1].end,
        cameras=[CameraTally() for _ in windows[0].cameras],
    )
    for w in windows:
        for total, tally in zip(merged.cameras, w.cameras, strict=True):
            total.captured += tally.captured
            total.answered += tally.answered
            total.dropped_client += tally.dropped_client
            total.dropped_server.update(tally.dropped_server)
            total.expired += tally.expired
            total.latency_ms.extend(tally.latency_ms)
            total.age_ms.extend(tally.age_ms)
            total.late_ms.extend(tally.late_ms)
    return merged


def summarize(
    windows: Sequence[FleetWindow], used: int, stream_errors: Counter[str]
) -> dict[str, Any]:
    """The step's figures from its last ``used`` windows: fleet totals and the worst camera.

    Durations are the windows' summed lengths, so rates stay right when windows differ.
    """
    chosen = list(windows[-used:]) if used > 0 else list(windows)
    duration = sum(w.duration_s for w in chosen)
    merged = merge_windows(chosen)
    cams = merged.cameras
    server: Counter[str] = Counter()
    for c in cams:
        server.update(c.dropped_server)
    captured = sum(c.captured for c in cams)
    answered = sum(c.answered for c in cams)
    drops = sum(c.drops() for c in cams)
    latency = _percentiles([x for c in cams for x in c.latency_ms])
    age = _percentiles([x for c in cams for x in c.age_ms])
    late = _percentiles([x for c in cams for x in c.late_ms])
    return {
        "duration_s": duration,
        "captured": captured,
        "answered": answered,
        "answered_fps": answered / duration if duration > 0 else math.nan,
        "dropped_client": sum(c.dropped_client for c in cams),
        "dropped_server": dict(server),
        "expired": sum(c.expired for c in cams),
        "drop_pct": min(100.0, 100.0 * drops / captured) if captured else math.nan,
        "latency_ms": latency or {"p50": math.nan, "p99": math.nan},
        "age_ms": age,
        "capture_late_p99_ms": late["p99"] if late else math.nan,
        "stream_errors": dict(stream_errors),
        "worst": _worst([_per_camera(c, duration) for c in cams]),
    }
