"""A short real run: `framecast bench` against an in-process Framecast server (null backend)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from framecast_bench.inputs import make_payloads, prepare_inputs, synthetic_sources
from framecast_bench.report import SPLIT_COMPONENTS, BenchReport
from framecast_bench.sessions import stream_payloads
from framecast_client import Client
from framecast_client.cli import main
from framecast_server.process.background import BackgroundServer
from support import make_settings


@pytest.fixture(scope="module")
def null_server(cache_dir: Path) -> Iterator[BackgroundServer]:
    # The null backend: the run measures serving overhead, not 2 CPU cores doing ResNet-50.
    with BackgroundServer(make_settings(cache_dir, backend="null")) as server:
        yield server


@pytest.mark.slow
def test_closed_loop_run_against_a_real_server(
    null_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.json"
    argv = [
        "bench", null_server.address, "--concurrency", "1,4", "--warmup", "0.5",
        "--window", "0.5", "--max-windows", "8", "--inputs", "4", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "c=4" in capsys.readouterr().out
    report = BenchReport.read_json(out)
    assert report.meta["backend"] == "null"
    assert report.meta["max_batch"] == 8
    assert [s.concurrency for s in report.steps] == [1, 4]
    for step in report.steps:
        assert step.errors == {}
        assert step.requests > 0
        assert step.untimed_requests == 0
        assert all(math.isfinite(v) for v in step.latency_ms.values())
        for c in SPLIT_COMPONENTS:
            assert step.split_ms[c]["mean"] >= 0.0
        assert step.split_ms["server_compute"]["mean"] > 0.0
        assert step.preprocess_ms["mean"] > 0.0
        # Little's law on a closed loop: throughput x mean latency = the concurrency.
        in_flight = step.throughput_rps * step.latency_ms["mean"] / 1000.0
        assert in_flight == pytest.approx(step.concurrency, rel=0.10)


def test_open_loop_run_against_a_real_server(null_server: BackgroundServer, tmp_path: Path) -> None:
    out = tmp_path / "open.json"
    argv = [
        "bench", null_server.address, "--rate", "40", "--warmup", "0.3", "--window", "0.5",
        "--max-windows", "3", "--inputs", "4", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    (step,) = BenchReport.read_json(out).steps
    assert step.loop == "open"
    assert step.errors == {}
    assert step.requests > 0
    assert math.isfinite(step.latency_ms["p99"])


@pytest.mark.slow
def test_stream_mode_against_a_real_server(null_server: BackgroundServer, tmp_path: Path) -> None:
    with Client(null_server.address) as client:
        # Stream frames go in carriers the session's preprocessing only slices back.
        payloads = make_payloads(
            prepare_inputs(synthetic_sources(2, 320, 240), client.preprocess, "s"), 1
        )
        for original, carried in zip(payloads, stream_payloads(client, payloads), strict=True):
            assert carried.batch.shape != original.batch.shape
            np.testing.assert_array_equal(client.preprocess(carried.batch[0]), original.batch[0])
    out = tmp_path / "stream.json"
    argv = [
        "bench", null_server.address, "--mode", "stream", "--concurrency", "2", "--warmup",
        "0.5", "--window", "0.5", "--max-windows", "5", "--inputs", "4", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = BenchReport.read_json(out)
    assert report.meta["mode"] == "stream"
    (step,) = report.steps
    assert step.errors == {}
    assert step.requests > 0
    assert step.split_ms["server_compute"]["mean"] > 0.0
    in_flight = step.throughput_rps * step.latency_ms["mean"] / 1000.0
    assert in_flight == pytest.approx(2, rel=0.10)
