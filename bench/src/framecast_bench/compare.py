"""``framecast bench --compare A.json B.json``: what changed between two runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from framecast_bench.report import BenchReport, StepResult

#: Step metrics compared, with whether a higher value is better.
COMPARED: tuple[tuple[str, bool], ...] = (
    ("throughput_rps", True),
    ("throughput_ips", True),
    ("p50", False),
    ("p90", False),
    ("p99", False),
    ("p99.9", False),
    ("mean", False),
)
#: Settings whose difference makes the two runs measure different things.
META_KEYS: tuple[str, ...] = (
    "address",
    "mode",
    "loop",
    "batch_size",
    "input",
    "model",
    "backend",
    "precision",
    "max_batch",
)


@dataclass(frozen=True)
class Delta:
    """One metric of one step in both runs."""

    metric: str
    a: float
    b: float
    higher_is_better: bool

    @property
    def change(self) -> float:
        """``b - a``."""
        return self.b - self.a

    @property
    def percent(self) -> float:
        """Relative change in percent of ``a`` (NaN when ``a`` is 0 or missing)."""
        if math.isnan(self.a) or math.isnan(self.b) or self.a == 0:
            return math.nan
        return 100.0 * (self.b - self.a) / self.a

    def verdict(self, threshold_pct: float) -> str:
        """``better``/``worse`` when the change exceeds ``threshold_pct``, else ``~``."""
        p = self.percent
        if math.isnan(p) or abs(p) < threshold_pct:
            return "~"
        return "better" if (p > 0) == self.higher_is_better else "worse"


def _metric(step: StepResult, name: str) -> float:
    if name == "throughput_rps":
        return step.throughput_rps
    if name == "throughput_ips":
        return step.throughput_ips
    value = step.latency_ms.get(name)
    return math.nan if value is None else float(value)


def _step_key(step: StepResult) -> tuple[str, float]:
    load = step.target_rate_rps if step.loop == "open" else step.concurrency
    return (step.loop, float(load if load is not None else math.nan))


def step_deltas(a: StepResult, b: StepResult) -> list[Delta]:
    """The compared metrics of two results for the same load step."""
    return [Delta(m, _metric(a, m), _metric(b, m), hib) for m, hib in COMPARED]


def compare_reports(a: BenchReport, b: BenchReport, threshold_pct: float = 5.0) -> str:
    """A text report of what changed from run ``a`` to run ``b``.

    Steps are matched by loop kind and load (concurrency or offered rate). A change is
    called better or worse only beyond ``threshold_pct``: a run-to-run difference smaller
    than that is usually noise.
    """
    lines: list[str] = []
    meta_changes = [
        f"  {k}: {a.meta.get(k)!r} -> {b.meta.get(k)!r}"
        for k in META_KEYS
        if a.meta.get(k) != b.meta.get(k)
    ]
    if meta_changes:
        lines.append("settings that differ (the runs may not be comparable):")
        lines += meta_changes
        lines.append("")
    steps_a = {_step_key(s): s for s in a.steps}
    steps_b = {_step_key(s): s for s in b.steps}
    header = f"{'step':>10}  {'metric':>14}  {'A':>10}  {'B':>10}  {'delta':>10}  {'%':>8}  verdict"
    lines += [header, "-" * len(header)]
    better = worse = 0
    for key, sa in steps_a.items():
        sb = steps_b.get(key)
        if sb is None:
            lines.append(f"{sa.load_label:>10}  only in A")
            continue
        for d in step_deltas(sa, sb):
            verdict = d.verdict(threshold_pct)
            better += verdict == "better"
            worse += verdict == "worse"
            lines.append(
                f"{sa.load_label:>10}  {d.metric:>14}  {_num(d.a):>10}  {_num(d.b):>10}  "
                f"{_signed(d.change):>10}  {_pct(d.percent):>8}  {verdict}"
            )
        errors_a, errors_b = sa.error_count, sb.error_count
        if errors_a or errors_b:
            lines.append(f"{sa.load_label:>10}  {'errors':>14}  {errors_a:>10}  {errors_b:>10}")
        if not (sa.stable and sb.stable):
            lines.append(f"{sa.load_label:>10}  note: a step did not stabilize; treat with care")
    for key, sb in steps_b.items():
        if key not in steps_a:
            lines.append(f"{sb.load_label:>10}  only in B")
    lines.append("")
    lines.append(
        f"{better} metric(s) better, {worse} worse beyond ±{threshold_pct:g}% "
        "(latencies: lower is better; throughput: higher is better)"
    )
    return "\n".join(lines)


def _num(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def _signed(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:+.3g}" if abs(v) < 10 else f"{v:+.1f}"


def _pct(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:+.1f}%"
