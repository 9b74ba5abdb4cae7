"""`serve --workers 2 --inference shared`: two front ends, one inference process, one batcher.

Real processes and signals: frames cross shared memory to the inference process and back; a
killed inference process turns every front end NOT_SERVING, is restarted, and a lossless
stream running through it loses no frame.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from framecast_client import Classification, Client
from grpc_health.v1 import health_pb2, health_pb2_grpc
from numpy.typing import NDArray
from prometheus_client.parser import text_string_to_metric_families
from support import INPUT_SIZE, serve_process, wait_until

DEADLINE_S = 120.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tail(log: Path, lines: int = 15) -> str:
    """The last lines of the host's log, for a failure to show what was going on."""
    return " | ".join(log.read_text(errors="replace").splitlines()[-lines:])


def health(address: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    except grpc.RpcError:
        return None
    return int(reply.status)


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def keyed(key: int) -> NDArray[np.uint8]:
    """A uniform frame the null backend classifies as class ``key`` (it keeps its key through
    the client's resize and crop)."""
    return np.full((INPUT_SIZE, INPUT_SIZE, 3), key, dtype=np.uint8)


def inference_pid(log: Path) -> int:
    found = re.findall(r"the inference process started \(pid (\d+)\)", log.read_text())
    return int(found[-1])


@pytest.fixture(params=[False, True], ids=["plain", "metrics"])
def shared_host(
    request: pytest.FixtureRequest, cache_dir: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    words = [
        "serve", "--workers", "2", "--inference", "shared", "--port", "0",
        "--backend", "null", "--offline", "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    if request.param:
        words += ["--metrics-port", "0"]
    with serve_process(tmp_path, *words) as server:
        yield server.process, server.address, server.log


@pytest.mark.slow
def test_front_ends_classify_and_stream_through_one_inference_process(
    shared_host: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, address, log = shared_host
    assert "one shared inference process for the 2 workers" in log.read_text()
    assert health(address) == SERVING
    # Several clients, so both front ends get connections; every answer is the frame's own.
    for key in range(1, 9):
        with Client(address, timeout=30) as client:
            results = client.classify([keyed(key), keyed(key + 100)])
            assert [r.top.index for r in results] == [key, key + 100]
    with Client(address, timeout=30) as client:
        frames = [keyed(k) for k in range(50)]
        with client.stream(frames, mode="lossless") as session:
            got = [r.outcome for r in session]
    assert all(isinstance(o, Classification) for o in got)
    assert [o.top.index for o in got if isinstance(o, Classification)] == list(range(50))
    # The Open Inference Protocol endpoint, through Triton's own client, rides the same hand-off.
    with triton.InferenceServerClient(address) as oip:
        assert oip.is_model_ready("resnet50")
        batch = np.stack([keyed(5), keyed(6), keyed(7)])
        tensor = triton.InferInput("images", list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        result = oip.infer(
            "resnet50", [tensor], outputs=[triton.InferRequestedOutput("probabilities")]
        )
        assert result.as_numpy("probabilities").argmax(axis=1).tolist() == [5, 6, 7]
    found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log.read_text())
    assert bool(found) == ("[metrics]" in os.environ.get("PYTEST_CURRENT_TEST", ""))
    if found:
        # One /metrics for the host: the front ends count calls and frames, the inference
        # process the batches: every frame, its own warm-up image and each front end's (a
        # front end checks the hand-off with one image before it says SERVING).
        samples = scrape(int(found[1]))
        frames_ok = sum(
            v for (name, labels), v in samples.items()
            if name == "framecast_frames_total" and ("code", "OK") in labels
        )  # fmt: skip
        assert frames_ok == 8 * 2 + 50 + 3
        assert samples[("framecast_batch_size_sum", frozenset())] == 8 * 2 + 50 + 3 + 1 + 2
        processes = {
            dict(labels).get("process")
            for (name, labels) in samples
            if name == "process_cpu_seconds_total"
        }
        assert processes == {"supervisor", "worker-0", "worker-1", "inference-2"}
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert "all workers stopped" in log.read_text()


@pytest.mark.slow
def test_a_killed_inference_process_turns_health_not_serving_and_loses_no_stream_frame(
    shared_host: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    _, address, log = shared_host
    victim = inference_pid(log)
    count = 400
    outcomes: list[object] = []

    def frames() -> Iterator[NDArray[np.uint8]]:
        for i in range(count):
            time.sleep(0.005)  # a camera, not a flood: the kill lands mid-stream
            yield keyed(i % 256)

    def stream() -> None:
        with (
            Client(address, timeout=60) as client,
            client.stream(frames(), mode="lossless") as session,
        ):
            for result in session:
                outcomes.append(result.outcome)

    def seen() -> str:
        return f"health {health(address)}, {len(outcomes)} answers; the log ends: {tail(log)}"

    # A daemon: a failing test must not leave the run waiting on a session that reconnects.
    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    # The kill lands mid-stream: once answers flow, with most of the frames still to come.
    wait_until(lambda: len(outcomes) >= 10, "the stream's first answers", timeout_s=DEADLINE_S,
               seen=seen)  # fmt: skip
    os.kill(victim, signal.SIGKILL)
    # Every front end says so while the inference process is gone (it takes seconds to load).
    wait_until(lambda: health(address) == NOT_SERVING, "NOT_SERVING", timeout_s=DEADLINE_S,
               seen=seen)  # fmt: skip
    wait_until(lambda: f"(pid {victim}) was killed by SIGKILL" in log.read_text(),
               "the restart", timeout_s=DEADLINE_S, seen=seen)  # fmt: skip
    wait_until(lambda: health(address) == SERVING, "SERVING again", timeout_s=DEADLINE_S,
               seen=seen)  # fmt: skip
    assert inference_pid(log) != victim
    streamer.join(DEADLINE_S)
    assert not streamer.is_alive()
    assert len(outcomes) == count
    classified = [o.top.index for o in outcomes if isinstance(o, Classification)]
    assert classified == [i % 256 for i in range(count)]
    with Client(address, timeout=30) as client:
        assert client.classify(keyed(42)).top.index == 42


@pytest.mark.slow
def test_a_killed_front_end_is_restarted_and_the_inference_process_keeps_serving(
    shared_host: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    _, address, log = shared_host
    inference = inference_pid(log)
    front = int(re.findall(r"worker 0 started \(pid (\d+)\)", log.read_text())[-1])
    os.kill(front, signal.SIGKILL)
    wait_until(lambda: f"(pid {front}) was killed by SIGKILL" in log.read_text(),
               "the restart", timeout_s=DEADLINE_S, seen=lambda: tail(log))  # fmt: skip
    wait_until(lambda: log.read_text().count("worker 0 serving") >= 2, "the new front end",
               timeout_s=DEADLINE_S, seen=lambda: tail(log))  # fmt: skip
    assert inference_pid(log) == inference  # untouched
    assert Path(f"/proc/{inference}").exists()
    for key in range(8):  # new connections, whichever front end they reach
        with Client(address, timeout=30) as client:
            assert client.classify(keyed(key)).top.index == key
