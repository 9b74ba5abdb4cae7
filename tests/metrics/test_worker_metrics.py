"""`serve --workers 2 --metrics-port 0`: one /metrics for the host, summed over real processes.

Traffic spread over both workers (separate connections), a real HTTP scrape of the supervisor,
then a worker killed: its counts stay, its live gauges go, its restart is counted on top.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from framecast_client import Client, InvalidArgumentError, wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_server.backends.base import BackendInfo
from framecast_server.core.batcher import BatcherStats
from framecast_server.metrics import Metrics
from framecast_server.model import PreparedModel
from framecast_server.model.presets import TORCHVISION
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from support import Host, random_frames, serve_workers, wait_until

DEADLINE_S = 60.0
CLASSIFY = "/framecast.v1.Classifier/Classify"
STREAM = "/framecast.v1.Classifier/ClassifyStream"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def workers_of(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    found = []
    for pid in children:
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except FileNotFoundError:
            continue  # it just ended
    return sorted(found)


def shared_dir(worker: int) -> Path:
    """The directory the supervisor gave the worker (in the worker's environment)."""
    for entry in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0"):
        if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
            return Path(entry.split(b"=", 1)[1].decode())
    raise AssertionError("the worker has no PROMETHEUS_MULTIPROC_DIR")


def own_figure(directory: Path, pid: int, name: str, **labels: str) -> float:
    """One worker's own figure, read from its files alone (not through the supervisor)."""
    files = [str(f) for f in directory.glob(f"*_{pid}.db")]
    for family in MultiProcessCollector.merge(files):  # type: ignore[no-untyped-call]
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


@pytest.fixture(params=["per-worker", "shared"])
def host(request: pytest.FixtureRequest, cache_dir: Path, tmp_path: Path) -> Iterator[Host]:
    """Two workers with their own backends, or two front ends and one inference process."""
    with serve_workers(cache_dir, tmp_path, inference=request.param) as running:
        yield running


def inference_pid(host: Host) -> int | None:
    """The shared inference process's pid (None with per-worker backends)."""
    found = re.findall(r"the inference process started \(pid (\d+)\)", host.log.read_text())
    return int(found[-1]) if found else None


def _open_stream(
    address: str, info_id: str
) -> tuple[grpc.Channel, queue.Queue[object], object, object]:
    """A stream left open after one frame: the worker holding it counts one active stream."""
    frames: queue.Queue[object] = queue.Queue()
    done = object()

    def requests() -> Iterator[pb.StreamRequest]:
        while (item := frames.get()) is not done:
            assert isinstance(item, pb.StreamRequest)
            yield item

    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    replies = pb_grpc.ClassifierStub(channel).ClassifyStream(requests(), timeout=60)
    frames.put(
        pb.StreamRequest(
            frame_id=0,
            image=wire.image_to_proto(np.zeros((224, 224, 3), np.uint8)),
            top_k=1,
            preprocessing_id=info_id,
        )
    )
    assert next(iter(replies)).HasField("classification")
    return channel, frames, done, replies  # the call lasts as long as its replies are held


@pytest.mark.slow
def test_one_scrape_sums_every_worker_and_keeps_a_dead_workers_counts(host: Host) -> None:
    inference = inference_pid(host)
    children = 2 if inference is None else 3
    workers = [pid for pid in workers_of(host.process.pid) if pid != inference]
    assert len(workers) == 2
    directory = shared_dir(workers[0])
    assert directory == shared_dir(workers[1])

    # Known traffic over sixteen connections (one per client), so both workers get some.
    clients, frames_each = 16, 3
    for seed in range(clients):
        with Client(host.address, timeout=30) as client:
            client.classify_preprocessed(random_frames(frames_each, seed=seed))
            if seed == 0:
                info_id = client.model_info().preprocessing_id
                with pytest.raises(InvalidArgumentError):
                    client.classify_preprocessed(np.zeros((1, 10, 10, 3), np.uint8))
    calls, frames = clients + 1, clients * frames_each
    per_worker = [own_figure(directory, pid, "framecast_requests_total",
                             method=CLASSIFY, code="OK") for pid in workers]  # fmt: skip
    assert sum(per_worker) == clients
    assert all(per_worker), per_worker  # both workers served some

    def figures(samples: Samples) -> dict[str, float]:
        return {
            "calls ok": value(samples, "framecast_requests_total", method=CLASSIFY, code="OK"),
            "calls invalid": value(samples, "framecast_requests_total", method=CLASSIFY,
                                   code="INVALID_ARGUMENT"),
            "durations": value(samples, "framecast_request_duration_seconds_count",
                               method=CLASSIFY),
            "frames": value(samples, "framecast_frames_total", method=CLASSIFY, code="OK"),
            "queued images": value(samples, "framecast_queue_duration_seconds_count"),
            "batched images": value(samples, "framecast_batch_size_sum"),
            "invalid": value(samples, "framecast_failures_total", reason="invalid"),
            "queue full": value(samples, "framecast_failures_total", reason="queue_full"),
        }  # fmt: skip

    def expected(more_images: int) -> dict[str, float]:
        return {
            "calls ok": clients, "calls invalid": 1, "durations": calls, "frames": frames,
            "queued images": frames + more_images, "batched images": frames + more_images,
            "invalid": 1, "queue full": 0,
        }  # fmt: skip

    samples = scrape(host.metrics_port)
    # Each worker warms up with one image: counted in the histograms, not in frames. (In
    # shared mode the inference process warms up, then each front end checks the hand-off
    # with one image.)
    warm_up = 2 if inference is None else 3
    assert figures(samples) == expected(more_images=warm_up)
    model = [k for k in samples if k[0] == "framecast_model_info"]
    assert len(model) == 1  # one series for the host, not one per worker
    assert samples[model[0]] == 1
    processes = {dict(k[1]).get("process") for k in samples if k[0] == "process_cpu_seconds_total"}
    named = {"supervisor", "worker-0", "worker-1"} | (
        set() if inference is None else {"inference-2"}
    )
    assert processes == named

    # A stream held open: one active stream on one worker, which is then killed.
    channel, stream_frames, done, _replies = _open_stream(host.address, info_id)
    try:
        assert value(scrape(host.metrics_port), "framecast_active_streams", method=STREAM) == 1
        holder = next(pid for pid in workers if own_figure(
            directory, pid, "framecast_active_streams", method=STREAM) == 1)  # fmt: skip
        os.kill(holder, signal.SIGKILL)
        wait_until(lambda: f"(pid {holder}) was killed by SIGKILL" in host.log.read_text(),
                   "the supervisor to see the worker die", timeout_s=DEADLINE_S)  # fmt: skip
        wait_until(lambda: len(workers_of(host.process.pid)) == children, "the worker's restart",
                   timeout_s=DEADLINE_S)  # fmt: skip
        wait_until(lambda: host.log.read_text().count("serving (pid") == children + 1,
                   "the new worker", timeout_s=DEADLINE_S)  # fmt: skip
    finally:
        stream_frames.put(done)
        channel.close()

    # The dead worker's counts are still there (with the stream's frame it answered), its
    # live gauges are gone, and the new worker's warm-up is counted on top.
    samples = scrape(host.metrics_port)
    assert figures(samples) == expected(more_images=warm_up + 1 + 1)
    assert value(samples, "framecast_frames_total", method=STREAM, code="OK") == 1
    assert value(samples, "framecast_active_streams", method=STREAM) == 0
    assert not list(directory.glob(f"gauge_live*_{holder}.db"))
    processes = {dict(k[1]).get("process") for k in samples if k[0] == "process_cpu_seconds_total"}
    assert processes == named

    # The supervisor drains, exits 0 and removes the directory it made.
    host.process.send_signal(signal.SIGTERM)
    assert host.process.wait(timeout=60) == 0
    assert not directory.exists()


def test_a_worker_publishes_the_batchers_figures_as_they_grow() -> None:
    # What a single server reads at scrape time, a worker copies into its files: counters
    # grow by what is new since the last copy, gauges are set. (In-process: the same objects
    # a worker uses, without the shared directory.)
    metrics = Metrics(max_batch=8, gpu=False, shared=True)
    stats = BatcherStats(
        queued=3, batches_run=0, images_run=0, failed_batches=1, failed_images=4,
        dropped_expired=5, dropped_cancelled=6, rejected_full=7, admitted_bytes=150528, callers=1,
    )  # fmt: skip
    current = [stats]
    model = PreparedModel(
        onnx_path=Path("m.onnx"), name="m", version="v", preset=TORCHVISION, pretrained=True,
        weights_source="test", warning="",
    )  # fmt: skip
    metrics.serving(lambda: current[0], model, BackendInfo("b", "fp16", "gpu"))
    metrics.publish()
    current[0] = dataclasses.replace(stats, rejected_full=9, queued=0, admitted_bytes=0)
    metrics.publish()
    metrics.publish()  # nothing new: nothing added
    registry = metrics.registry
    for reason, expected in (("deadline", 5), ("cancelled", 6), ("queue_full", 9), ("backend", 4)):
        assert registry.get_sample_value("framecast_failures_total", {"reason": reason}) == expected
    assert registry.get_sample_value("framecast_queue_images") == 0
    assert registry.get_sample_value("framecast_admitted_bytes") == 0
    labels = {"model": "m", "version": "v", "backend": "b", "precision": "fp16", "device": "gpu",
              "pretrained": "true"}  # fmt: skip
    assert registry.get_sample_value("framecast_model_info", labels) == 1
    assert registry.get_sample_value("process_cpu_seconds_total") is None  # the supervisor's
