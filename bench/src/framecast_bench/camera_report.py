"""Camera-fleet results: one step per fleet size, as a table, JSON, CSV and a plot."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from framecast_bench.plot import _log_ticks, _pyplot
from framecast_bench.report import WindowResult, _nan_to_none

CAMERA_REPORT_FORMAT = "framecast-bench-cameras/1"


@dataclass
class CameraStep:
    """One fleet size's figures: totals over every camera, and the worst camera's.

    ``drop_pct`` counts every frame captured without a useful answer (dropped on the client,
    on the server, or answered after the max age); ``age_ms`` is None when the server states no
    frame age (the Open Inference Protocol). ``worst`` holds, figure by figure, the value of the
    camera that did worst on it. ``slo_misses`` lists the bounds of ``--slo`` the step missed.
    """

    cameras: int
    fps: float
    stable: bool
    duration_s: float
    captured: int
    answered: int
    answered_fps: float
    dropped_client: int
    dropped_server: dict[str, int]
    expired: int
    drop_pct: float
    latency_ms: dict[str, float]
    age_ms: dict[str, float] | None
    capture_late_p99_ms: float
    stream_errors: dict[str, int]
    worst: dict[str, float | None]
    windows: list[WindowResult] = field(default_factory=list)
    slo_misses: list[str] | None = None

    @property
    def meets_slo(self) -> bool | None:
        """Whether the step met ``--slo`` (None without one)."""
        return None if self.slo_misses is None else not self.slo_misses

    def slo_values(self) -> dict[str, float | None]:
        """The figures an SLO bounds, by its keys (see :mod:`framecast_bench.slo`)."""
        age = self.age_ms or {}
        return {
            "p50": self.latency_ms["p50"],
            "p99": self.latency_ms["p99"],
            "age_p50": age.get("p50"),
            "age_p99": age.get("p99"),
            "drops": self.drop_pct,
        }

    @classmethod
    def from_figures(
        cls,
        cameras: int,
        fps: float,
        stable: bool,
        figures: Mapping[str, Any],
        windows: Sequence[WindowResult],
    ) -> CameraStep:
        """A step from :func:`framecast_bench.camera_stats.summarize`'s figures."""
        nan = math.nan
        return cls(
            cameras=cameras,
            fps=fps,
            stable=stable,
            duration_s=figures.get("duration_s", 0.0),
            captured=figures.get("captured", 0),
            answered=figures.get("answered", 0),
            answered_fps=figures.get("answered_fps", nan),
            dropped_client=figures.get("dropped_client", 0),
            dropped_server=dict(figures.get("dropped_server", {})),
            expired=figures.get("expired", 0),
            drop_pct=figures.get("drop_pct", nan),
            latency_ms=dict(figures.get("latency_ms", {"p50": nan, "p99": nan})),
            age_ms=figures.get("age_ms"),
            capture_late_p99_ms=figures.get("capture_late_p99_ms", nan),
            stream_errors=dict(figures.get("stream_errors", {})),
            worst=dict(figures.get("worst", {})),
            windows=list(windows),
        )


@dataclass
class FindMax:
    """``--find-max``: the largest fleet that met the SLO, and every size tried."""

    slo: str
    max_cameras: int
    limit_reached: bool  # the search stopped at --max-cameras, still meeting the SLO
    tried: dict[int, bool]

    def line(self, fps: float) -> str:
        """The one line the search prints."""
        tried = ", ".join(f"{n} {'ok' if ok else 'missed'}" for n, ok in self.tried.items())
        limit = " (the --max-cameras limit; more may fit)" if self.limit_reached else ""
        return (
            f"find-max: {self.max_cameras} cameras at {fps:g} fps within {self.slo}{limit} "
            f"[tried: {tried}]"
        )


@dataclass
class CameraReport:
    """A camera-fleet run: what was measured against what, its steps, the search's result."""

    meta: dict[str, Any]
    steps: list[CameraStep] = field(default_factory=list)
    find_max: FindMax | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {"format": CAMERA_REPORT_FORMAT, **asdict(self)}
        if self.find_max is not None:
            data["find_max"]["tried"] = {str(k): v for k, v in self.find_max.tried.items()}
        return _nan_to_none(data)  # type: ignore[no-any-return]

    def write_json(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        Path(path).write_text(text + "\n", encoding="utf-8")

    def write_csv(self, path: str | Path) -> None:
        Path(path).write_text(csv_text(self.steps), encoding="utf-8", newline="")


CSV_COLUMNS: tuple[str, ...] = (
    "cameras", "fps", "stable", "duration_s", "captured", "answered", "answered_fps",
    "dropped_client", "dropped_server", "expired", "drop_pct", "latency_p50_ms",
    "latency_p99_ms", "age_p50_ms", "age_p99_ms", "capture_late_p99_ms", "stream_errors",
    "worst_answered_fps", "worst_drop_pct", "worst_latency_p50_ms", "worst_latency_p99_ms",
    "worst_age_p50_ms", "worst_age_p99_ms", "meets_slo",
)  # fmt: skip


def _counts(counts: Mapping[str, int]) -> str:
    return ";".join(f"{k}:{v}" for k, v in sorted(counts.items()))


def csv_row(step: CameraStep) -> dict[str, Any]:
    """One step as a flat CSV row; absent figures are empty cells."""
    age = step.age_ms or {}
    row: dict[str, Any] = {
        "cameras": step.cameras,
        "fps": step.fps,
        "stable": step.stable,
        "duration_s": step.duration_s,
        "captured": step.captured,
        "answered": step.answered,
        "answered_fps": step.answered_fps,
        "dropped_client": step.dropped_client,
        "dropped_server": _counts(step.dropped_server),
        "expired": step.expired,
        "drop_pct": step.drop_pct,
        "latency_p50_ms": step.latency_ms.get("p50"),
        "latency_p99_ms": step.latency_ms.get("p99"),
        "age_p50_ms": age.get("p50"),
        "age_p99_ms": age.get("p99"),
        "capture_late_p99_ms": step.capture_late_p99_ms,
        "stream_errors": _counts(step.stream_errors),
        **{f"worst_{k}": v for k, v in step.worst.items()},
        "meets_slo": step.meets_slo,
    }
    return {k: _nan_to_none(row.get(k)) for k in CSV_COLUMNS}


def csv_text(steps: Sequence[CameraStep]) -> str:
    """Every step as CSV, one row per step."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for step in steps:
        writer.writerow(csv_row(step))
    return out.getvalue()


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def format_camera_table(steps: Sequence[CameraStep]) -> str:
    """The steps as a terminal table: fleet totals, then the worst camera (w.)."""
    header = (
        f"{'cameras':>7} {'fps':>5} {'ans/s':>8} {'drop%':>6} {'client':>6} {'server':>6} "
        f"{'expir':>5} {'p50':>7} {'p99':>7} {'age50':>6} {'age99':>6} {'late99':>6} "
        f"{'w.ans/s':>7} {'w.drop%':>7} {'w.p99':>7} {'w.age99':>7}  note"
    )
    lines = [header]
    for s in steps:
        age = s.age_ms or {}
        notes = [] if s.stable else ["NOT stable"]
        if s.stream_errors:
            notes.append(f"stream errors {_counts(s.stream_errors)}")
        if s.dropped_server:
            notes.append(f"server {_counts(s.dropped_server)}")
        if s.slo_misses:
            notes.append("missed " + "; ".join(s.slo_misses))
        elif s.slo_misses is not None:
            notes.append("meets SLO")
        w = s.worst
        lines.append(
            f"{s.cameras:>7} {s.fps:>5g} {s.answered_fps:>8.1f} {_ms(s.drop_pct):>6} "
            f"{s.dropped_client:>6} {sum(s.dropped_server.values()):>6} {s.expired:>5} "
            f"{_ms(s.latency_ms.get('p50')):>7} {_ms(s.latency_ms.get('p99')):>7} "
            f"{_ms(age.get('p50')):>6} {_ms(age.get('p99')):>6} "
            f"{_ms(s.capture_late_p99_ms):>6} {_ms(w.get('answered_fps')):>7} "
            f"{_ms(w.get('drop_pct')):>7} {_ms(w.get('latency_p99_ms')):>7} "
            f"{_ms(w.get('age_p99_ms')):>7}  {', '.join(notes)}"
        )
    lines.append(
        "ms; drop% = frames captured without a useful answer; age = at compute, as the server "
        "states it ('-': not stated); late99 = how late captures were taken (the client's own "
        "lag); w. = the worst camera"
    )
    return "\n".join(lines)


def plot_cameras(steps: Sequence[CameraStep], path: str | Path, title: str) -> None:
    """Write a PNG: p99 latency (total and worst camera) and drop % against the fleet size."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    plt = _pyplot()
    steps = sorted(steps, key=lambda s: s.cameras)
    xs = [s.cameras for s in steps]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    try:
        p99 = [s.latency_ms.get("p99", math.nan) for s in steps]
        worst = [s.worst.get("latency_p99_ms") or math.nan for s in steps]
        ax.plot(xs, p99, marker="o", label="p99 latency (all cameras)")
        ax.plot(xs, worst, marker="^", linestyle="--", label="p99 latency (worst camera)")
        finite = [v for v in (*p99, *worst) if not math.isnan(v) and v > 0]
        ax.set_yscale("log")
        if finite:
            low, high = min(finite) / 1.2, max(finite) * 1.2
            ax.set_ylim(low, high)
            ax.yaxis.set_major_locator(FixedLocator(_log_ticks(low, high)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("latency p99 (ms)")
        drops = fig.axes[0].twinx()
        drops.plot(xs, [s.drop_pct for s in steps], marker="s", color="red", label="drops %")
        drops.set_ylabel("frames dropped (%)", color="red")
        drops.set_ylim(bottom=0)
        # Cameras double from step to step: a log axis, each size a labelled tick.
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator([float(x) for x in xs]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"cameras (at {steps[0].fps:g} fps each)" if steps else "cameras")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        lines = ax.get_legend_handles_labels()
        more = drops.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="best")
        fig.tight_layout()
        fig.savefig(str(path), format="png")
    finally:
        plt.close(fig)
