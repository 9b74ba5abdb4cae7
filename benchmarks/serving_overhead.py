"""Serving overhead, side by side in one run: Framecast vs raw gRPC echo, and served vs in-process.

Usage: uv run python benchmarks/serving_overhead.py [--seconds 4] [--out FILE]

Three ratios, each measured against its baseline in the same run, with the servers in their own
processes (as in production: client and server do not share a GIL):

1. unary, concurrency 1: Framecast (null backend) p50 latency / raw gRPC unary echo p50;
2. bidi stream, 8 frames in flight: Framecast (null backend) frames/s / raw gRPC bidi echo
   frames/s, plus the Framecast server's CPU time per frame (from /proc);
3. ONNX Runtime ResNet-50: served images/s / the same backend's in-process images/s, at the
   same batch size.

The raw echo server is grpc.aio with generic handlers on bytes: it does not parse the request
and answers a 64-byte reply, so it is the cheapest possible server for the same request bytes.
Rounds alternate between the two sides so drift in machine load hits both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from framecast_client import Client
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.wire import image_to_proto

SIZE = 224
ECHO_REPLY = b"\x00" * 64


# ---------------------------------------------------------------- raw echo server (subprocess)
async def _echo_server(port_file: Path) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return ECHO_REPLY

    async def stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield ECHO_REPLY

    handler = grpc.method_handlers_generic_handler(
        "echo.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )
    limit = 64 * 1024 * 1024
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))  # noqa: ASYNC240 (once, before serving)
    await server.wait_for_termination()


@contextmanager
def _process(command: list[str], port_file: Path) -> Iterator[tuple[str, int]]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {command}")
            time.sleep(0.05)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=300)
        yield address, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


def _framecast_server(tmp: Path, backend: str, max_batch: int) -> list[str]:
    return [
        sys.executable, "-m", "framecast_client.cli", "serve", "--port", "0",
        "--port-file", str(tmp / f"{backend}.port"), "--backend", backend, "--offline",
        "--max-batch", str(max_batch), "--cache-dir", str(tmp / "engines"),
    ]  # fmt: skip


def _wait_serving(address: str) -> None:
    deadline = time.monotonic() + 300
    with Client(address, timeout=5) as client:
        while True:
            try:
                client.model_info()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- unary, concurrency 1
def _unary_echo(address: str, payload: bytes, seconds: float) -> list[float]:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/echo.Echo/Unary", None, None)
        return _timed_loop(lambda: call(payload, timeout=10), seconds)


def _unary_framecast(address: str, frame: np.ndarray, seconds: float) -> list[float]:
    with Client(address, timeout=10) as client:
        client.model_info()
        return _timed_loop(lambda: client.classify_preprocessed(frame, top_k=1), seconds)


def _timed_loop(call: object, seconds: float) -> list[float]:
    assert callable(call)
    for _ in range(50):  # warm-up
        call()
    latencies: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(latencies) < 200_000:
        started = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - started) * 1000.0)
    return latencies


# ---------------------------------------------------------------- bidi stream, 8 in flight
async def _stream_rate(
    open_stream: object, request: object, seconds: float, in_flight: int = 8
) -> tuple[int, float]:
    """Frames/s of a bidi stream keeping `in_flight` frames outstanding."""
    window = asyncio.Semaphore(in_flight)
    stop_at = time.monotonic() + seconds

    async def requests() -> AsyncIterator[object]:
        while time.monotonic() < stop_at:
            await window.acquire()
            yield request

    assert callable(open_stream)
    call = open_stream(requests())
    received = 0
    started = time.perf_counter()
    async for _ in call:
        received += 1
        window.release()
    return received, received / (time.perf_counter() - started)


async def _measured_stream(
    open_stream: object, request: object, seconds: float, server_pid: int
) -> tuple[float, float]:
    """(frames/s, server CPU microseconds per frame) after a short warm-up stream."""
    await _stream_rate(open_stream, request, 0.5)
    cpu_before = _cpu_seconds(server_pid)
    received, rate = await _stream_rate(open_stream, request, seconds)
    return rate, (_cpu_seconds(server_pid) - cpu_before) / max(received, 1) * 1e6


async def _stream_echo(
    address: str, payload: bytes, seconds: float, pid: int
) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.stream_stream("/echo.Echo/Stream", None, None)
        return await _measured_stream(stream, payload, seconds, pid)


async def _stream_framecast(
    address: str, request: pb.StreamRequest, seconds: float, pid: int
) -> tuple[float, float]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        return await _measured_stream(stub.ClassifyStream, request, seconds, pid)


# ---------------------------------------------------------------- ONNX Runtime served vs in-process
def _in_process_rate(onnx_path: Path, batch: np.ndarray, seconds: float) -> float:
    from framecast_server.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(onnx_path, max_batch=len(batch))
    backend.infer(batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        backend.infer(batch)
        done += len(batch)
    rate = done / (time.perf_counter() - started)
    backend.close()
    return rate


def _served_rate(address: str, batch: np.ndarray, seconds: float) -> float:
    """Two requests in flight so the server always has the next batch queued."""
    from concurrent.futures import ThreadPoolExecutor

    with Client(address, timeout=120) as client:
        client.classify_preprocessed(batch, top_k=1)
        stop_at = time.monotonic() + seconds

        def worker() -> int:
            done = 0
            while time.monotonic() < stop_at:
                client.classify_preprocessed(batch, top_k=1)
                done += len(batch)
            return done

        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            total = sum(pool.map(lambda _: worker(), range(2)))
        return total / (time.perf_counter() - started)


def _show(title: str, figures: dict[str, float | str]) -> None:
    print(title)
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"  {key:<26} {shown}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement window")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the ORT ratio")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per ratio")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/serving_overhead.json")
    )
    parser.add_argument("--echo-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        asyncio.run(_echo_server(args.echo_server))
        return 0

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    unary_payload = pb.ClassifyRequest(
        images=[image_to_proto(frame[0])], top_k=1
    ).SerializeToString()
    stream_request = pb.StreamRequest(frame_id=1, image=image_to_proto(frame[0]), top_k=1)
    stream_payload = stream_request.SerializeToString()
    results: dict[str, dict[str, float | str]] = {
        "settings": {"seconds_per_window": args.seconds, "rounds": args.rounds}
    }

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        echo_cmd = [sys.executable, __file__, "--echo-server", str(tmp / "echo.port")]
        with (
            _process(echo_cmd, tmp / "echo.port") as (echo, echo_pid),
            _process(_framecast_server(tmp, "null", 32), tmp / "null.port") as (null, null_pid),
        ):
            _wait_serving(null)
            echo_p50, fc_p50 = [], []
            for _ in range(args.rounds):
                echo_p50.append(statistics.median(_unary_echo(echo, unary_payload, args.seconds)))
                fc_p50.append(statistics.median(_unary_framecast(null, frame, args.seconds)))
            results["unary"] = {
                "echo_p50_ms": statistics.median(echo_p50),
                "framecast_p50_ms": statistics.median(fc_p50),
                "ratio": statistics.median(fc_p50) / statistics.median(echo_p50),
                "target": "<= 1.2",
            }
            _show("unary p50 latency (ms), concurrency 1", results["unary"])

            echo_runs, fc_runs = [], []
            for _ in range(args.rounds):
                echo_runs.append(
                    asyncio.run(_stream_echo(echo, stream_payload, args.seconds, echo_pid))
                )
                fc_runs.append(
                    asyncio.run(_stream_framecast(null, stream_request, args.seconds, null_pid))
                )
            echo_rate = statistics.median(r for r, _ in echo_runs)
            fc_rate = statistics.median(r for r, _ in fc_runs)
            results["stream"] = {
                "echo_frames_per_s": echo_rate,
                "framecast_frames_per_s": fc_rate,
                "ratio": fc_rate / echo_rate,
                "echo_server_cpu_us_per_frame": statistics.median(c for _, c in echo_runs),
                "framecast_server_cpu_us_per_frame": statistics.median(c for _, c in fc_runs),
                "target": ">= 0.85",
            }
            _show("bidi stream, 8 in flight", results["stream"])

        batch = rng.integers(0, 256, (args.batch, SIZE, SIZE, 3), dtype=np.uint8)
        with _process(
            _framecast_server(tmp, "onnxruntime", args.batch), tmp / "onnxruntime.port"
        ) as (ort_address, _):
            _wait_serving(ort_address)
            onnx_path = next((tmp / "engines" / "prepared").glob("*.onnx"))
            served, local = [], []
            # Alternating; the idle server process uses no CPU while the in-process side runs.
            for _ in range(args.rounds):
                served.append(_served_rate(ort_address, batch, args.seconds * 2))
                local.append(_in_process_rate(onnx_path, batch, args.seconds * 2))
        results["onnxruntime"] = {
            "batch": args.batch,
            "served_images_per_s": statistics.median(served),
            "in_process_images_per_s": statistics.median(local),
            "ratio": statistics.median(served) / statistics.median(local),
            "target": ">= 0.95",
        }
        _show(f"ONNX Runtime ResNet-50, batch {args.batch}", results["onnxruntime"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
