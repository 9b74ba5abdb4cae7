"""The /metrics endpoint, scraped over real HTTP after known traffic: the numbers add up."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from framecast_client import (
    Client,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServerError,
    UnauthenticatedError,
    wire,
)
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_server.backends.base import BackendInfo
from framecast_server.core.batcher import BatcherStats
from framecast_server.metrics import Metrics
from framecast_server.model import PreparedModel
from framecast_server.model.presets import TORCHVISION
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import IN_PROCESS, ServedHost, in_process_only, random_frames, wait_until

TOKEN = "metrics-test-token"
CLASSIFY = "/framecast.v1.Classifier/Classify"
STREAM = "/framecast.v1.Classifier/ClassifyStream"
INFO = "/framecast.v1.Classifier/GetModelInfo"
WATCH = "/grpc.health.v1.Health/Watch"
FAIL_KEY = 77
FRAME = 224 * 224 * 3  # bytes of one image
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return parse(reply.read().decode())


@pytest.fixture
def server(start_host: Callable[..., ServedHost], tmp_path: Path) -> ServedHost:
    """The host under test: in process, or `serve --workers 2 --inference shared`, whose
    /metrics sums the front ends' and the inference process's files."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"cam-a:{TOKEN}\n")
    return start_host(
        fail_key=FAIL_KEY, metrics_port=0, auth_tokens=tokens, max_batch=8, max_queue=8
    )


def test_scrape_after_known_traffic_adds_up(server: ServedHost) -> None:
    port = server.metrics_port
    assert port is not None
    before = scrape(port)
    # The warm-up image: of the one server, or of the inference process and each front end (a
    # front end checks the hand-off with one image before it says SERVING).
    warm_up = 1 if server.kind == IN_PROCESS else 1 + 2
    assert value(before, "framecast_queue_duration_seconds_count") == warm_up

    with Client(server.address, token=TOKEN, timeout=30) as client:
        info = client.model_info()
        client.classify_preprocessed(random_frames(5))
        for seed in range(3):
            client.classify_preprocessed(random_frames(2, seed=seed))
        # Invalid: an image of the wrong size.
        with pytest.raises(InvalidArgumentError):
            client.classify_preprocessed(np.zeros((1, 10, 10, 3), np.uint8))
        # A backend failure: the backend refuses images whose first byte is FAIL_KEY.
        failing = np.full((1, 224, 224, 3), FAIL_KEY, np.uint8)
        with pytest.raises(ServerError):
            client.classify_preprocessed(failing)
        # A raw stream read to its end, so that it ends OK on both sides (a session may close
        # its call once every result is in, which the server can see as CANCELLED).
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        requests = [
            pb.StreamRequest(
                frame_id=i,
                image=wire.image_to_proto(np.full((224, 224, 3), i, np.uint8)),
                top_k=1,
                preprocessing_id=info.preprocessing_id,
            )
            for i in range(6)
        ]
        with grpc.insecure_channel(server.address) as channel:
            replies = list(
                pb_grpc.ClassifierStub(channel).ClassifyStream(
                    iter(requests), timeout=30, metadata=metadata
                )
            )
        assert all(r.HasField("classification") for r in replies)
        assert len(replies) == 6

        # Queue full and cancelled: hold the backend with one batch of 8, queue 4 more; this
        # caller then has more than a max batch admitted, so the last quarter of the queue (2
        # of 8) is kept for others and 4 more do not fit.
        server.hold()
        held = threading.Thread(target=client.classify_preprocessed, args=(random_frames(8),))
        held.start()
        assert server.wait_entered(30)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.ClassifierStub(channel)
            queued = stub.Classify.future(
                pb.ClassifyRequest.FromString(
                    wire.classify_request_bytes(
                        random_frames(4), top_k=1, preprocessing_id=info.preprocessing_id
                    )
                ),
                timeout=60,
                metadata=metadata,
            )
            wait_until(lambda: server.queued() == 4, "4 queued images")
            # The host's queue and admitted bytes (a worker publishes them every
            # PUBLISH_INTERVAL_S): 4 waiting, 8 + 4 admitted.
            held_figures = {"framecast_queue_images": 4, "framecast_admitted_bytes": 12 * FRAME}

            def scraped_figures() -> dict[str, float]:
                samples = scrape(port)
                return {name: value(samples, name) for name in held_figures}

            wait_until(lambda: scraped_figures() == held_figures, "4 images queued, 12 admitted",
                       seen=scraped_figures)  # fmt: skip
            with pytest.raises(ResourceExhaustedError):
                client.classify_preprocessed(random_frames(4))
            queued.cancel()  # type: ignore[no-untyped-call]
            wait_until(
                lambda: (
                    value(
                        scrape(port), "framecast_requests_total", method=CLASSIFY, code="CANCELLED"
                    )
                    == 1
                ),
                "the cancelled call to be counted",
            )
        server.release()
        held.join(30)

    with Client(server.address, timeout=30) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.model_info()

    after = scrape(port)
    # Calls by method and code.
    assert value(after, "framecast_requests_total", method=CLASSIFY, code="OK") == 4 + 1
    assert value(after, "framecast_requests_total", method=CLASSIFY, code="INVALID_ARGUMENT") == 1
    assert value(after, "framecast_requests_total", method=CLASSIFY, code="INTERNAL") == 1
    assert value(after, "framecast_requests_total", method=CLASSIFY, code="RESOURCE_EXHAUSTED") == 1
    assert value(after, "framecast_requests_total", method=CLASSIFY, code="CANCELLED") == 1
    assert value(after, "framecast_requests_total", method=STREAM, code="OK") == 1
    assert value(after, "framecast_requests_total", method=INFO, code="UNAUTHENTICATED") == 1
    assert value(after, "framecast_request_duration_seconds_count", method=CLASSIFY) == 9
    assert value(after, "framecast_active_streams", method=STREAM) == 0
    # Frames by method and code.
    ok_frames = 5 + 3 * 2 + 8
    assert value(after, "framecast_frames_total", method=CLASSIFY, code="OK") == ok_frames
    assert value(after, "framecast_frames_total", method=STREAM, code="OK") == 6
    assert value(after, "framecast_frames_total", method=CLASSIFY, code="INVALID_ARGUMENT") == 1
    assert value(after, "framecast_frames_total", method=CLASSIFY, code="INTERNAL") == 1
    assert value(after, "framecast_frames_total", method=CLASSIFY, code="RESOURCE_EXHAUSTED") == 4
    # Failures by reason. A worker of --workers publishes the batcher's figures every
    # PUBLISH_INTERVAL_S (metrics/exporter.py): they may take that long to show.
    # The queue is empty again by then.
    failures = {"queue_full": 4, "cancelled": 4, "backend": 1, "invalid": 1, "deadline": 0}
    published = {**failures, "framecast_queue_images": 0, "framecast_admitted_bytes": 0}

    def scraped_failures() -> dict[str, float]:
        samples = scrape(port)
        found = {r: value(samples, "framecast_failures_total", reason=r) for r in failures}
        for name in ("framecast_queue_images", "framecast_admitted_bytes"):
            found[name] = value(samples, name)
        return found

    wait_until(lambda: scraped_failures() == published, "the failures", seen=scraped_failures)
    assert value(after, "framecast_auth_failures_total", reason="missing") == 1
    # Histograms: every image that ran, once; every batch once.
    ran = warm_up + ok_frames + 6  # the warm-up, the unary images, the stream frames
    assert value(after, "framecast_queue_duration_seconds_count") == ran
    assert value(after, "framecast_batch_size_sum") == ran
    batches = value(after, "framecast_batch_size_count")
    assert 1 < batches <= ran
    assert value(after, "framecast_compute_duration_seconds_count") == batches
    assert value(after, "framecast_connections_active") == 0
    # Who called, and what is served.
    authenticated_calls = sum(
        v
        for (name, labels), v in after.items()
        if name == "framecast_requests_total" and ("code", "UNAUTHENTICATED") not in labels
    )
    assert value(after, "framecast_caller_requests_total", caller="cam-a") == authenticated_calls
    model = {k: v for k, v in next(labels for (n, labels) in after if n == "framecast_model_info")}
    assert model["backend"] == "null"
    assert model["pretrained"] == "false"
    # One series per process with --workers (the supervisor, front ends, inference process).
    cpu = [v for (n, labels), v in after.items() if n == "process_cpu_seconds_total"]
    assert len(cpu) == (1 if server.kind == IN_PROCESS else 4)
    assert all(v > 0 for v in cpu)


def test_batcher_counters_map_onto_failure_reasons() -> None:
    metrics = Metrics(max_batch=8, gpu=False)
    stats = BatcherStats(
        queued=3,
        batches_run=0,
        images_run=0,
        failed_batches=1,
        failed_images=4,
        dropped_expired=5,
        dropped_cancelled=6,
        rejected_full=7,
        admitted_bytes=150528,
        callers=1,
    )
    model = PreparedModel(
        onnx_path=Path("m.onnx"),
        name="m",
        version="v",
        preset=TORCHVISION,
        pretrained=True,
        weights_source="test",
        warning="",
    )
    metrics.serving(lambda: stats, model, BackendInfo("b", "fp16", "gpu"))
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "framecast_failures_total", reason="deadline") == 5
    assert value(samples, "framecast_failures_total", reason="cancelled") == 6
    assert value(samples, "framecast_failures_total", reason="queue_full") == 7
    assert value(samples, "framecast_failures_total", reason="backend") == 4
    assert value(samples, "framecast_queue_images") == 3
    assert value(samples, "framecast_admitted_bytes") == 150528
    info = dict(next(labels for (n, labels) in samples if n == "framecast_model_info"))
    assert info == {
        "model": "m",
        "version": "v",
        "backend": "b",
        "precision": "fp16",
        "device": "gpu",
        "pretrained": "true",
    }


def test_an_unknown_method_does_not_grow_the_labels(server: ServedHost) -> None:
    port = server.metrics_port
    assert port is not None
    with grpc.insecure_channel(server.address) as channel:
        for name in ("/x.Y/Z1", "/x.Y/Z2"):
            with pytest.raises(grpc.RpcError) as e:
                channel.unary_unary(name, None, None)(b"", timeout=30)
            assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
    samples = scrape(port)
    methods = {
        dict(labels)["method"] for (name, labels) in samples if name == "framecast_requests_total"
    }
    assert methods == {"unknown"}
    assert value(samples, "framecast_requests_total", method="unknown", code="UNIMPLEMENTED") == 2


@in_process_only(
    "health watches and connections are counted by each front end alone, as in one server; "
    "nothing of the inference process is involved"
)
def test_streams_written_by_the_servicer_itself_pass_through_and_are_counted(
    server: ServedHost,
) -> None:
    # Health.Watch writes with context.write (no generator): the interceptor must drive it so.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = server.metrics_port
    assert port is not None
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        during = scrape(port)
        assert value(during, "framecast_active_streams", method=WATCH) == 1
        assert value(during, "framecast_connections_active") == 1
        watch.cancel()
        wait_until(
            lambda: value(scrape(port), "framecast_active_streams", method=WATCH) == 0,
            "the watch to end",
        )
    samples = scrape(port)
    assert value(samples, "framecast_requests_total", method=WATCH, code="CANCELLED") == 1
    assert value(samples, "framecast_connections_active") == 0


class _FakeNVML:
    """A strict stand-in for pynvml on a machine with one GPU (we have none here)."""

    class _Util:
        gpu = 87

    class _Memory:
        used = 3 * 2**30
        total = 80 * 2**30

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        pass

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        if index != 0:
            raise ValueError(f"no GPU {index}")
        return "gpu0"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> _Util:  # noqa: N802
        assert handle == "gpu0"
        return self._Util()

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> _Memory:  # noqa: N802
        assert handle == "gpu0"
        return self._Memory()

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:  # noqa: N802
        assert handle == "gpu0"
        return 312_500  # milliwatts


def test_gpu_metrics_come_from_nvml_where_it_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNVML())
    metrics = Metrics(max_batch=8)
    assert metrics.gpu
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "framecast_gpu_utilization_ratio", gpu="0") == pytest.approx(0.87)
    assert value(samples, "framecast_gpu_memory_used_bytes", gpu="0") == 3 * 2**30
    assert value(samples, "framecast_gpu_memory_total_bytes", gpu="0") == 80 * 2**30
    assert value(samples, "framecast_gpu_power_watts", gpu="0") == pytest.approx(312.5)


def test_without_nvml_there_are_no_gpu_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails, as where it is absent
    metrics = Metrics(max_batch=8)
    assert not metrics.gpu
    assert "framecast_gpu_" not in generate_latest(metrics.registry).decode()


def test_the_open_inference_protocol_gets_the_same_auth_and_metrics(
    server: ServedHost,
) -> None:
    from framecast_bench import oip_codec as oip
    from framecast_oip._proto import open_inference_pb2_grpc as oip_grpc

    port = server.metrics_port
    assert port is not None
    request = oip.infer_request(random_frames(3), model_name="resnet50", class_count=1)
    with grpc.insecure_channel(server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfer(request, timeout=30)
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        reply = stub.ModelInfer(
            request, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        assert reply.outputs
    samples = scrape(port)
    method = "/inference.GRPCInferenceService/ModelInfer"
    assert value(samples, "framecast_requests_total", method=method, code="OK") == 1
    assert value(samples, "framecast_requests_total", method=method, code="UNAUTHENTICATED") == 1
    assert value(samples, "framecast_frames_total", method=method, code="OK") == 3
    assert value(samples, "framecast_caller_requests_total", caller="cam-a") == 1
