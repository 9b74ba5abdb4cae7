"""--compare: per-step deltas between two runs."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from framecast_bench.compare import compare_reports, step_deltas
from framecast_bench.report import BenchReport, StepResult

StepFactory = Callable[..., StepResult]
ReportFactory = Callable[..., BenchReport]


def test_deltas_and_percentages(step_factory: StepFactory) -> None:
    a = step_factory(concurrency=4, latency_ms=10.0, requests=100)
    b = step_factory(concurrency=4, latency_ms=12.0, requests=80)
    deltas = {d.metric: d for d in step_deltas(a, b)}
    assert deltas["throughput_rps"].percent == pytest.approx(-20.0)
    assert deltas["p50"].percent == pytest.approx(20.0, abs=1.5)
    assert deltas["throughput_rps"].verdict(5.0) == "worse"
    assert deltas["p99"].verdict(5.0) == "worse"
    assert deltas["p99"].verdict(50.0) == "~"


def test_compare_output_names_each_step_and_metric(report_factory: ReportFactory) -> None:
    a = report_factory(scale=1.0, concurrencies=(1, 4))
    b = report_factory(scale=0.5, concurrencies=(1, 4, 16))
    b.meta["backend"] = "tensorrt"
    text = compare_reports(a, b)
    assert "backend: None -> 'tensorrt'" in text
    lines = text.splitlines()
    p99_c4 = next(line for line in lines if line.split()[:2] == ["c=4", "p99"])
    # Latencies halved: about -50 %, better.
    pct = float(re.search(r"([+-]\d+\.\d)%", p99_c4).group(1))  # type: ignore[union-attr]
    assert -51.0 <= pct <= -49.0
    assert p99_c4.endswith("better")
    tput = next(line for line in lines if line.split()[:2] == ["c=1", "throughput_rps"])
    assert tput.endswith("~")  # same request counts and windows: no change
    assert any(line.split() == ["c=16", "only", "in", "B"] for line in lines)
    assert "worse" not in "\n".join(line for line in lines if line.startswith(" ") and "%" in line)


def test_identical_runs_show_no_change(report_factory: ReportFactory) -> None:
    a = report_factory()
    text = compare_reports(a, report_factory())
    assert "0 metric(s) better, 0 worse" in text
    assert "settings that differ" not in text
