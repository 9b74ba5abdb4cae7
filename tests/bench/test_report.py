"""Step summaries and the report's JSON, CSV and table forms."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from framecast_bench.report import (
    LATENCY_KEYS,
    SPLIT_COMPONENTS,
    BenchReport,
    StepResult,
    csv_columns,
    csv_text,
    format_table,
)
from framecast_client.histogram import LogHistogram

StepFactory = Callable[..., StepResult]
ReportFactory = Callable[..., BenchReport]


def test_step_summary_numbers(step_factory: StepFactory) -> None:
    step = step_factory(
        concurrency=4, latency_ms=10.0, requests=100, window_s=1.0, errors={"UNAVAILABLE": 2}
    )
    assert step.requests == 300
    assert step.images == 600
    assert step.duration_s == pytest.approx(3.0)
    assert step.throughput_rps == pytest.approx(100.0)
    assert step.throughput_ips == pytest.approx(200.0)
    assert step.errors == {"UNAVAILABLE": 6}
    assert set(step.latency_ms) == set(LATENCY_KEYS)
    # Totals are 10.0 .. 10.9 ms; mean 10.45 exactly, percentiles within 1 %.
    assert step.latency_ms["mean"] == pytest.approx(10.45)
    assert step.latency_ms["max"] == pytest.approx(10.9)
    assert step.latency_ms["p50"] == pytest.approx(10.4, rel=0.011)
    # The split's means add up to the total's mean: queue 2, compute 5, network the rest.
    split_means = {c: step.split_ms[c]["mean"] for c in SPLIT_COMPONENTS}
    assert split_means["server_queue"] == pytest.approx(2.0)
    assert split_means["server_compute"] == pytest.approx(5.0)
    assert split_means["network"] == pytest.approx(3.45)
    assert sum(split_means.values()) == pytest.approx(step.latency_ms["mean"])
    assert step.preprocess_ms["mean"] == pytest.approx(1.5)
    assert [w.requests for w in step.windows] == [100, 100, 100]


def test_json_round_trip(tmp_path: Path, report_factory: ReportFactory) -> None:
    report = report_factory()
    path = tmp_path / "run.json"
    report.write_json(path)
    data = json.loads(path.read_text())
    assert data["format"] == "framecast-bench/1"
    step = data["steps"][1]
    for key in (
        "loop",
        "concurrency",
        "throughput_rps",
        "throughput_ips",
        "latency_ms",
        "split_ms",
        "preprocess_ms",
        "errors",
        "stable",
        "windows",
        "histogram",
    ):
        assert key in step
    assert set(step["latency_ms"]) == {"p50", "p90", "p95", "p99", "p99.9", "max", "mean", "min"}
    assert set(step["split_ms"]) == {"client_wait", "network", "server_queue", "server_compute"}
    back = BenchReport.read_json(path)
    assert back.meta == report.meta
    assert [s.throughput_rps for s in back.steps] == [s.throughput_rps for s in report.steps]
    assert back.steps[1].latency_ms == report.steps[1].latency_ms
    # The histogram in the JSON answers any other percentile later.
    h = LogHistogram.from_dict(step["histogram"])
    assert h.count == report.steps[1].requests


def test_json_writes_missing_numbers_as_null_and_reads_them_back(
    tmp_path: Path, report_factory: ReportFactory
) -> None:
    report = report_factory()
    report.steps[0].latency_ms["p99.9"] = math.nan
    path = tmp_path / "run.json"
    report.write_json(path)  # allow_nan=False: NaN would raise
    assert json.loads(path.read_text())["steps"][0]["latency_ms"]["p99.9"] is None
    assert math.isnan(BenchReport.read_json(path).steps[0].latency_ms["p99.9"])


def test_reading_something_else_fails(tmp_path: Path) -> None:
    path = tmp_path / "other.json"
    path.write_text('{"steps": []}')
    with pytest.raises(ValueError, match="framecast-bench"):
        BenchReport.read_json(path)


def test_csv_fields(report_factory: ReportFactory) -> None:
    report = report_factory()
    report.steps[0].errors = {"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 1}
    rows = list(csv.DictReader(io.StringIO(csv_text(report.steps))))
    assert len(rows) == 2
    assert list(rows[0]) == csv_columns()
    for col in (
        "throughput_rps",
        "latency_p99_ms",
        "latency_p99.9_ms",
        "latency_max_ms",
        "latency_mean_ms",
        "network_mean_ms",
        "server_queue_mean_ms",
        "server_compute_mean_ms",
        "preprocess_mean_ms",
        "errors_by_code",
    ):
        assert col in rows[0]
    assert rows[0]["concurrency"] == "1"
    assert float(rows[1]["throughput_rps"]) == pytest.approx(report.steps[1].throughput_rps)
    assert float(rows[1]["latency_p99_ms"]) == pytest.approx(report.steps[1].latency_ms["p99"])
    assert rows[0]["errors"] == "4"
    assert rows[0]["errors_by_code"] == "DEADLINE_EXCEEDED=1;UNAVAILABLE=3"
    assert rows[0]["target_rate_rps"] == ""


def test_open_loop_steps_show_the_offered_rate(report_factory: ReportFactory) -> None:
    report = report_factory()
    assert "offered/s" not in format_table(report.steps)
    step = report.steps[0]
    step.loop, step.concurrency, step.target_rate_rps, step.offered_rps = "open", None, 100.0, 93.4
    lines = format_table(report.steps).splitlines()
    assert lines[0].split()[:2] == ["load", "offered/s"]
    assert lines[2].split()[:2] == ["r=100/s", "93.4"]
    row = next(csv.DictReader(io.StringIO(csv_text(report.steps))))
    assert float(row["offered_rps"]) == pytest.approx(93.4)
    assert row["target_rate_rps"] == "100.0"


def test_table_lists_every_step_and_column(report_factory: ReportFactory) -> None:
    report = report_factory(concurrencies=(1, 2, 8))
    report.steps[2].errors = {"RESOURCE_EXHAUSTED": 5}
    report.steps[2].stable = False
    table = format_table(report.steps)
    lines = table.splitlines()
    header = lines[0].split()
    assert header[:3] == ["load", "req/s", "img/s"]
    assert {"p50", "p99", "p99.9", "max", "mean", "net", "queue", "comp", "errors"} <= set(header)
    assert lines[2].split()[0] == "c=1"
    assert lines[4].split()[0] == "c=8"
    assert "RESOURCE_EXHAUSTED:5" in lines[4]
    assert lines[4].split()[-1] == "NO"
