"""End to end through the real client and gRPC against a small in-process stub server.

The stub serves the framecast.v1 protocol from the client's own generated code: one
"device" (a lock) that takes COMPUTE_S per request, so queueing and compute are real and
reported in each result's server timing. It runs whatever state the server package is in.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from framecast_bench.cli import run
from framecast_bench.report import BenchReport
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.cli import build_parser

COMPUTE_S = 0.002


class StubClassifier(pb_grpc.ClassifierServicer):
    """Serializes requests on one lock; fails every ``fail_every``-th with RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        self.device = threading.Lock()
        self.count_lock = threading.Lock()
        self.calls = 0
        self.fail_every = 0

    def GetModelInfo(self, request: Any, context: Any) -> pb.ModelInfo:  # noqa: N802 (gRPC name)
        return pb.ModelInfo(
            name="stub",
            version="1",
            backend="null",
            precision="fp32",
            max_batch=8,
            preprocessing=pb.Preprocessing(
                input_height=224,
                input_width=224,
                resize_policy=pb.RESIZE_POLICY_SHORTER_SIDE_THEN_CENTER_CROP,
                resize_size=256,
                interpolation=pb.INTERPOLATION_BILINEAR,
                normalization="torchvision",
            ),
            pretrained=False,
            weights_source="none",
            labels=[f"class{i}" for i in range(10)],
            max_message_bytes=64 * 2**20,
        )

    def Classify(self, request: Any, context: Any) -> pb.ClassifyResponse:  # noqa: N802
        with self.count_lock:
            self.calls += 1
            n = self.calls
        if self.fail_every and n % self.fail_every == 0:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        arrived = time.perf_counter()
        with self.device:
            started = time.perf_counter()
            time.sleep(COMPUTE_S)
            finished = time.perf_counter()
        timing = pb.ServerTiming(
            queue_us=int((started - arrived) * 1e6),
            compute_us=int((finished - started) * 1e6),
            batch_size=len(request.images),
        )
        result = pb.Classification(
            predictions=[pb.Prediction(index=0, label="class0", probability=1.0)], timing=timing
        )
        return pb.ClassifyResponse(results=[result] * len(request.images))

    def ClassifyStream(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the stub does not stream")


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[str, StubClassifier]]:
    servicer = StubClassifier()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        options=[("grpc.max_receive_message_length", 64 * 2**20)],
    )
    pb_grpc.add_ClassifierServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


FAST = ["--warmup", "0.3", "--window", "0.5", "--inputs", "4", "--frame-size", "320x240"]


def bench(argv: list[str]) -> int:
    args = build_parser().parse_args(["bench", *argv])
    return run(args)


@pytest.mark.slow
def test_closed_loop_report_and_littles_law(
    stub: tuple[str, StubClassifier], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = stub
    out_json, out_csv = tmp_path / "run.json", tmp_path / "run.csv"
    argv = [address, "--concurrency", "1,4", "--max-windows", "5", *FAST]
    assert bench([*argv, "--json", str(out_json), "--csv", str(out_csv)]) == 0
    table = capsys.readouterr().out
    assert "c=1" in table
    assert "c=4" in table

    data = json.loads(out_json.read_text())
    assert data["meta"]["backend"] == "null"
    assert data["meta"]["mode"] == "unary"
    report = BenchReport.read_json(out_json)
    assert [s.concurrency for s in report.steps] == [1, 4]
    for step in report.steps:
        assert step.errors == {}
        assert step.requests > 0
        assert step.images == step.requests
        for key in ("p50", "p90", "p95", "p99", "p99.9", "max", "mean"):
            assert math.isfinite(step.latency_ms[key])
        assert step.latency_ms["p50"] <= step.latency_ms["p99"] <= step.latency_ms["max"]
        # The stub computes for COMPUTE_S per request and says so in its timing.
        assert step.split_ms["server_compute"]["mean"] >= COMPUTE_S * 1000.0 * 0.9
        assert step.split_ms["network"]["mean"] > 0.0
        assert step.preprocess_ms["mean"] > 0.0
        assert step.untimed_requests == 0
        # Little's law: requests in flight = throughput x time in the system.
        in_flight = step.throughput_rps * step.latency_ms["mean"] / 1000.0
        assert in_flight == pytest.approx(step.concurrency, rel=0.10)
    # Four workers on one device: they queue behind each other.
    c4 = report.steps[1]
    assert c4.split_ms["server_queue"]["mean"] > COMPUTE_S * 1000.0
    assert len(out_csv.read_text().splitlines()) == 3


def test_open_loop_and_batch_mode(stub: tuple[str, StubClassifier], tmp_path: Path) -> None:
    address, _ = stub
    out = tmp_path / "open.json"
    argv = [address, "--mode", "batch", "--batch-size", "4", "--rate", "50", "--max-windows", "3"]
    assert bench([*argv, *FAST, "--json", str(out)]) == 0
    (step,) = BenchReport.read_json(out).steps
    assert step.loop == "open"
    assert step.target_rate_rps == 50.0
    assert step.requests > 0
    assert step.images == 4 * step.requests
    assert step.errors == {}
    # Far below capacity: the server keeps up with the offered rate.
    assert step.throughput_rps == pytest.approx(50.0, rel=0.5)
    assert math.isfinite(step.split_ms["client_wait"]["mean"])


def test_errors_are_counted_by_status_code(
    stub: tuple[str, StubClassifier], tmp_path: Path
) -> None:
    address, servicer = stub
    servicer.fail_every = 5
    try:
        out = tmp_path / "errors.json"
        argv = [address, "--concurrency", "2", "--max-windows", "3", *FAST, "--json", str(out)]
        assert bench(argv) == 0
    finally:
        servicer.fail_every = 0
    (step,) = BenchReport.read_json(out).steps
    assert set(step.errors) == {"RESOURCE_EXHAUSTED"}
    total = step.requests + step.error_count
    assert step.error_count == pytest.approx(total / 5, abs=2)


def test_batch_larger_than_the_server_allows_is_refused(
    stub: tuple[str, StubClassifier], capsys: pytest.CaptureFixture[str]
) -> None:
    address, _ = stub
    assert bench([address, "--mode", "batch", "--batch-size", "9", *FAST]) == 2
    assert "max batch of 8" in capsys.readouterr().err


def test_plot_of_a_run(stub: tuple[str, StubClassifier], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    address, _ = stub
    png = tmp_path / "run.png"
    argv = [address, "--concurrency", "1,2", "--max-windows", "1", *FAST, "--plot", str(png)]
    assert bench(argv) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
