"""Benchmark results: the data model and its JSON, CSV and terminal-table forms."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from framecast_client.histogram import LogHistogram

REPORT_FORMAT = "framecast-bench/1"
#: Percentile keys of every latency summary, in display order.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)
LATENCY_KEYS: tuple[str, ...] = (*(k for k, _ in PERCENTILES), "max", "mean", "min")
#: Components the total latency splits into; their means add up to the total's mean.
SPLIT_COMPONENTS: tuple[str, ...] = ("client_wait", "network", "server_queue", "server_compute")
SPLIT_KEYS: tuple[str, ...] = ("mean", "p50", "p99")


def latency_summary(h: LogHistogram) -> dict[str, float]:
    """Percentiles, max, mean and min of ``h`` (NaN when empty), keyed by LATENCY_KEYS."""
    out = {key: h.percentile(q) for key, q in PERCENTILES}
    out["max"] = h.max if h.count else math.nan
    out["mean"] = h.mean
    out["min"] = h.min if h.count else math.nan
    return out


def short_summary(h: LogHistogram) -> dict[str, float]:
    """Mean, p50 and p99 of ``h``, keyed by SPLIT_KEYS."""
    return {"mean": h.mean, "p50": h.percentile(50.0), "p99": h.percentile(99.0)}


@dataclass
class WindowResult:
    """One measurement window of a step (what the stability criterion looks at)."""

    duration_s: float
    requests: int
    errors: int
    throughput_rps: float
    p99_ms: float


@dataclass
class StepResult:
    """What one load level (a concurrency or an offered rate) measured.

    Latencies are per request, in milliseconds, from the moment the request was due (closed
    loop: sent; open loop: its scheduled time) to its response. ``split_ms`` breaks that
    total into client-side wait (open loop: sent late because every worker was busy),
    network plus serialization (total minus the server's queue and compute times), server
    queue and server compute; the components' means add up to the total's mean.
    ``preprocess_ms`` is the client preprocessing a real client would have done for the
    request's images (measured once per input; the generator sends preprocessed arrays).
    """

    loop: str  # "closed" or "open"
    concurrency: int | None
    target_rate_rps: float | None
    duration_s: float
    requests: int
    images: int
    throughput_rps: float
    throughput_ips: float
    latency_ms: dict[str, float]
    split_ms: dict[str, dict[str, float]]
    preprocess_ms: dict[str, float]
    errors: dict[str, int]
    stable: bool
    windows: list[WindowResult]
    untimed_requests: int = 0
    histogram: dict[str, Any] | None = None
    #: Open loop: the rate the schedule actually offered during the reported windows (a
    #: Poisson schedule offers the target rate only on average).
    offered_rps: float | None = None

    @property
    def load_label(self) -> str:
        """``c=4`` for a closed-loop step, ``r=100/s`` for an open-loop one."""
        if self.loop == "open":
            return f"r={_fmt_number(self.target_rate_rps or 0.0)}/s"
        return f"c={self.concurrency}"

    @property
    def error_count(self) -> int:
        """All failed requests of the step."""
        return sum(self.errors.values())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepResult:
        """Rebuild a step from its JSON form."""
        values = dict(data)
        values["windows"] = [WindowResult(**w) for w in values.get("windows", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class BenchReport:
    """A whole benchmark run: how it was run, and one result per load step."""

    meta: dict[str, Any]
    steps: list[StepResult] = field(default_factory=list)
    format: str = REPORT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (NaN becomes null)."""
        return _nan_to_none(asdict(self))  # type: ignore[no-any-return]

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchReport:
        """Rebuild a report from :meth:`to_dict`'s output."""
        fmt = data.get("format")
        if fmt != REPORT_FORMAT:
            raise ValueError(f"not a {REPORT_FORMAT} report (format: {fmt!r})")
        steps = [StepResult.from_dict(_none_to_nan(s)) for s in data.get("steps", [])]
        return cls(meta=dict(data.get("meta", {})), steps=steps)

    @classmethod
    def read_json(cls, path: str | Path) -> BenchReport:
        """Load a report written by :meth:`write_json`."""
        with Path(path).open(encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def write_csv(self, path: str | Path) -> None:
        """Write :func:`csv_text` to ``path``."""
        Path(path).write_text(csv_text(self.steps), encoding="utf-8", newline="")


def csv_columns() -> list[str]:
    """The CSV header: one row per step, every number flattened into its own column."""
    cols = [
        "loop",
        "concurrency",
        "target_rate_rps",
        "duration_s",
        "requests",
        "images",
        "throughput_rps",
        "throughput_ips",
        "offered_rps",
    ]
    cols += [f"latency_{k}_ms" for k in LATENCY_KEYS]
    cols += [f"{c}_{k}_ms" for c in SPLIT_COMPONENTS for k in SPLIT_KEYS]
    cols += [f"preprocess_{k}_ms" for k in SPLIT_KEYS]
    cols += ["errors", "errors_by_code", "stable", "windows", "untimed_requests"]
    return cols


def csv_row(step: StepResult) -> dict[str, Any]:
    """One step as a CSV row keyed by :func:`csv_columns` (NaN written empty)."""
    row: dict[str, Any] = {
        "loop": step.loop,
        "concurrency": step.concurrency,
        "target_rate_rps": step.target_rate_rps,
        "duration_s": step.duration_s,
        "requests": step.requests,
        "images": step.images,
        "throughput_rps": step.throughput_rps,
        "throughput_ips": step.throughput_ips,
        "offered_rps": step.offered_rps,
    }
    for k in LATENCY_KEYS:
        row[f"latency_{k}_ms"] = step.latency_ms.get(k)
    for c in SPLIT_COMPONENTS:
        for k in SPLIT_KEYS:
            row[f"{c}_{k}_ms"] = step.split_ms.get(c, {}).get(k)
    for k in SPLIT_KEYS:
        row[f"preprocess_{k}_ms"] = step.preprocess_ms.get(k)
    row["errors"] = step.error_count
    row["errors_by_code"] = ";".join(f"{k}={v}" for k, v in sorted(step.errors.items()))
    row["stable"] = step.stable
    row["windows"] = len(step.windows)
    row["untimed_requests"] = step.untimed_requests
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def csv_text(steps: Sequence[StepResult]) -> str:
    """All steps as CSV text with a header row."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_columns(), lineterminator="\n")
    writer.writeheader()
    for step in steps:
        writer.writerow(csv_row(step))
    return buf.getvalue()


def format_table(steps: Sequence[StepResult]) -> str:
    """The terminal table: throughput, latency percentiles, latency split and errors per step."""
    show_offered = any(s.offered_rps is not None for s in steps)
    header = [
        "load",
        *(["offered/s"] if show_offered else []),
        "req/s",
        "img/s",
        *(k for k, _ in PERCENTILES),
        "max",
        "mean",
        "wait",
        "net",
        "queue",
        "comp",
        "prep",
        "errors",
        "stable",
    ]
    rows: list[list[str]] = []
    for s in steps:
        rows.append(
            [
                s.load_label,
                *([_fmt_number(s.offered_rps)] if show_offered else []),
                _fmt_number(s.throughput_rps),
                _fmt_number(s.throughput_ips),
                *(_fmt_ms(s.latency_ms.get(k, math.nan)) for k, _ in PERCENTILES),
                _fmt_ms(s.latency_ms.get("max", math.nan)),
                _fmt_ms(s.latency_ms.get("mean", math.nan)),
                *(_fmt_ms(s.split_ms.get(c, {}).get("mean", math.nan)) for c in SPLIT_COMPONENTS),
                _fmt_ms(s.preprocess_ms.get("mean", math.nan)),
                _fmt_errors(s.errors),
                "yes" if s.stable else "NO",
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if show_offered:
        lines.append("offered/s: the rate the open-loop schedule offered in the reported windows")
    lines.append(
        "latencies in ms per request; wait/net/queue/comp: mean split of the latency "
        "(client wait, network+serialization, server queue, server compute); "
        "prep: mean client preprocessing per request (not part of the latency)"
    )
    return "\n".join(lines)


def print_table(steps: Sequence[StepResult], file: TextIO) -> None:
    """Write :func:`format_table` to ``file``."""
    print(format_table(steps), file=file)


def _fmt_ms(v: float) -> str:
    if v is None or math.isnan(v):
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _fmt_number(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    if v >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.1f}"


def _fmt_errors(errors: Mapping[str, int]) -> str:
    if not errors:
        return "0"
    return ",".join(f"{k}:{v}" for k, v in sorted(errors.items()))


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nan_to_none(v) for v in obj]
    return obj


def _none_to_nan(step: Mapping[str, Any]) -> dict[str, Any]:
    # Only the latency dicts use NaN for "no data"; elsewhere None means "not applicable".
    out = dict(step)
    for key in ("latency_ms", "preprocess_ms"):
        if isinstance(out.get(key), dict):
            out[key] = {k: math.nan if v is None else v for k, v in out[key].items()}
    if isinstance(out.get("split_ms"), dict):
        out["split_ms"] = {
            c: {k: math.nan if v is None else v for k, v in d.items()}
            for c, d in out["split_ms"].items()
        }
    if isinstance(out.get("windows"), list):
        out["windows"] = [
            {k: math.nan if v is None else v for k, v in w.items()} for w in out["windows"]
        ]
    return out
