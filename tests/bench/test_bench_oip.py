"""`framecast bench --protocol oip`: the same load over the Open Inference Protocol, for real."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from framecast_bench.inputs import Payload
from framecast_bench.oip_sessions import OipSession, OipStream, OipTarget
from framecast_bench.report import BenchReport
from framecast_client import Client
from framecast_client.cli import main
from framecast_server.process.background import BackgroundServer
from support import make_settings, random_frames


@pytest.fixture(scope="module")
def null_server(cache_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(make_settings(cache_dir, backend="null")) as server:
        yield server


def keyed(keys: list[int]) -> np.ndarray:
    frames = random_frames(len(keys), seed=3)
    frames[:, 0, 0, 0] = keys
    return frames


def test_discovery_reads_what_perf_analyzer_reads(null_server: BackgroundServer) -> None:
    with OipTarget(null_server.address, model="resnet50", timeout=10) as target:
        info = target.discover()
    assert info.name == "resnet50"
    assert info.max_batch == 8
    # Framecast's metadata properties carry its preprocessing: the same as GetModelInfo's.
    with Client(null_server.address) as client:
        assert info.preprocessing == client.model_info().preprocessing
    assert "framecast" in info.backend


def test_unary_session_and_stream_return_the_servers_classes(
    null_server: BackgroundServer,
) -> None:
    with OipTarget(null_server.address, model="resnet50", timeout=10) as target:
        target.discover()
        results = OipSession(target, top_k=3).send(Payload(keyed([5, 6]), preprocess_ms=0.0))
        assert [[p.index for p in r.predictions] for r in results] == [[5, 6, 7], [6, 7, 8]]
        stream = OipStream(target, list(keyed(list(range(20)))), 4, top_k=1)
        try:
            got = [(r.index, r.outcome.top.index) for r in stream]  # type: ignore[union-attr]
        finally:
            stream.close()
    assert got == [(i, i) for i in range(20)]


@pytest.mark.parametrize("mode", ["unary", "batch", "stream"])
def test_bench_runs_each_mode_over_oip(
    mode: str, null_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"{mode}.json"
    argv = [
        "bench", null_server.address, "--protocol", "oip", "--mode", mode, "--concurrency", "4",
        "--warmup", "0.2", "--window", "0.3", "--max-windows", "3", "--inputs", "4",
        "--json", str(out),
    ]  # fmt: skip
    if mode == "batch":
        argv += ["--batch-size", "4"]
    assert main(argv) == 0
    assert "c=4" in capsys.readouterr().out
    report = BenchReport.read_json(out)
    assert report.meta["protocol"] == "oip"
    (step,) = report.steps
    assert step.errors == {}
    assert step.requests > 0
    assert math.isfinite(step.latency_ms["p99"])


def test_an_unknown_model_is_one_line(
    null_server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", null_server.address, "--protocol", "oip", "--model", "vgg16"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("framecast bench: no Open Inference Protocol model 'vgg16'")
    assert "NOT_FOUND" in err
    assert "\n" not in err
