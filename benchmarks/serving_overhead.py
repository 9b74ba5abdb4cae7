"""Serving overhead, side by side in one run: Framecast vs raw gRPC echo, and served vs in-process.

Usage: uv run python benchmarks/serving_overhead.py [--seconds 2] [--rounds 9] [--out FILE]

Three ratios, each measured against its baseline in the same run, with the servers in their own
processes (as in production: client and server do not share a GIL):

1. unary, concurrency 1: Framecast (null backend) p50 latency / raw gRPC unary echo p50;
2. bidi stream, 8 frames in flight: Framecast (null backend) frames/s / raw gRPC bidi echo
   frames/s, plus each server's CPU time per frame (from /proc);
3. ONNX Runtime ResNet-50: served images/s / the same backend's in-process images/s, at the
   same batch size.

The raw echo server is grpc.aio with generic handlers on bytes, on the same event loop as
Framecast's server (uvloop where available): it does not parse the request and answers a
64-byte reply, so it is the cheapest possible server for the same request bytes.
For ratios 1 and 2 the client is the same for both servers: it sends the same pre-serialized
request bytes and does not parse the replies, so the ratio compares the servers alone (the
client shares the machine's cores with the server, and protobuf work done only on one side's
client would be charged to that server). The SDK's own figures (``Client.classify_preprocessed``,
a protobuf stream client) are reported beside them, not used for the ratios.

A third unary server hops through one worker thread per request and does nothing else: the
floor for any server that keeps inference off its event loop, as Framecast does (on a
virtual machine a cross-thread wake-up can cost more than the rest of the request).

Rounds alternate between the sides so drift in machine load hits both; each ratio is the median
of the per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from framecast_client import Client
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.wire import image_to_proto
from framecast_server.event_loop import run
from serve_process import cpu_seconds, running, serve_command, wait_health

SIZE = 224
ECHO_REPLY = b"\x00" * 64


# ---------------------------------------------------------------- raw echo server (subprocess)
async def _echo_server(port_file: Path) -> None:
    hop = ThreadPoolExecutor(1)

    async def unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return ECHO_REPLY

    async def unary_hop(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await asyncio.get_running_loop().run_in_executor(hop, len, request)
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
            "UnaryHop": grpc.unary_unary_rpc_method_handler(unary_hop),
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


def _prepared_onnx(address: str, cache: Path) -> Path:
    """The graph the server is serving: the prepared file named by its model version."""
    with Client(address, timeout=10) as client:
        version = client.model_info().version
    matches = list((cache / "prepared").glob(f"{version}*.onnx"))
    if len(matches) != 1:
        raise RuntimeError(f"expected one prepared model for version {version}, got {matches}")
    return matches[0]


# ---------------------------------------------------------------- unary, concurrency 1
CLASSIFY = "/framecast.v1.Classifier/Classify"
STREAM = "/framecast.v1.Classifier/ClassifyStream"


def _unary_raw(address: str, method: str, payload: bytes, seconds: float) -> list[float]:
    """Latencies (ms) of `payload` sent as is, the reply not parsed: the same client for all."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method, None, None)
        if method == CLASSIFY:  # a result, not an error, before timing anything
            pb.ClassifyResponse.FromString(call(payload, timeout=10)).results[0].predictions[0]
        return _timed_loop(lambda: call(payload, timeout=10), seconds)


def _unary_sdk(address: str, frame: np.ndarray, seconds: float) -> list[float]:
    with Client(address, timeout=10) as client:
        client.model_info()
        return _timed_loop(lambda: client.classify_preprocessed(frame, top_k=1), seconds)


def _timed_loop(call: Callable[[], object], seconds: float) -> list[float]:
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
    """(frames received, frames/s) of a bidi stream keeping `in_flight` frames outstanding."""
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
    last: object = None
    async for reply in call:
        received += 1
        window.release()
        last = reply
    _check_reply(last)
    return received, received / (time.perf_counter() - started)


def _check_reply(reply: object) -> None:
    """A Framecast reply must be a result, not an error: a server failing fast is not fast."""
    if isinstance(reply, bytes) and reply != ECHO_REPLY:
        reply = pb.StreamResponse.FromString(reply)
    if isinstance(reply, pb.StreamResponse) and not reply.HasField("classification"):
        raise RuntimeError(f"Framecast answered with an error: {reply}")


async def _measured_stream(
    open_stream: object, request: object, seconds: float, server_pid: int
) -> tuple[float, float]:
    """(frames/s, server CPU microseconds per frame) after a short warm-up stream."""
    await _stream_rate(open_stream, request, 0.5)
    cpu_before = cpu_seconds(server_pid)
    received, rate = await _stream_rate(open_stream, request, seconds)
    return rate, (cpu_seconds(server_pid) - cpu_before) / max(received, 1) * 1e6


async def _stream_raw(
    address: str, method: str, payload: bytes, seconds: float, pid: int
) -> tuple[float, float]:
    """`payload` sent as is, replies not parsed: the same client for the echo and Framecast."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = channel.stream_stream(method, None, None)
        return await _measured_stream(stream, payload, seconds, pid)


async def _stream_sdk(
    address: str, request: pb.StreamRequest, seconds: float, pid: int
) -> tuple[float, float]:
    """A protobuf client (requests serialized, replies parsed), as SDK users pay for."""
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


def _p50(latencies: list[float]) -> float:
    return statistics.median(latencies)


def _round_ratios(side: list[float], baseline: list[float]) -> str:
    return " ".join(f"{a / b:.3f}" for a, b in zip(side, baseline, strict=True))


def _paired_ratio(side: list[float], baseline: list[float]) -> float:
    """Median of the per-round ratios: each round's two sides ran back to back."""
    return statistics.median(a / b for a, b in zip(side, baseline, strict=True))


def _show(title: str, figures: dict[str, float | str]) -> None:
    print(title)
    for key, value in figures.items():
        shown = f"{value:.3f}" if isinstance(value, float) else value
        print(f"  {key:<26} {shown}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement window")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the ORT ratio")
    parser.add_argument("--rounds", type=int, default=9, help="alternating rounds per ratio")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/serving_overhead.json")
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="model cache for the servers (default: a temporary one)"
    )
    parser.add_argument("--echo-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        # The same event loop as `framecast serve` (uvloop where available): the two servers
        # differ in what they do per request, not in the loop under it.
        run(_echo_server(args.echo_server))
        return 0

    secs = args.seconds
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
        cache = args.cache_dir or tmp / "engines"
        echo_cmd = [sys.executable, __file__, "--echo-server", str(tmp / "echo.port")]
        null_cmd = serve_command(tmp / "null.port", cache, "--max-batch", "32")
        with (
            running(echo_cmd, tmp / "echo.port") as (echo, echo_pid),
            running(null_cmd, tmp / "null.port") as (null, null_pid),
        ):
            wait_health(null)
            echo_p50, hop_p50, fc_p50, sdk_p50 = [], [], [], []
            for _ in range(args.rounds):
                echo_p50.append(_p50(_unary_raw(echo, "/echo.Echo/Unary", unary_payload, secs)))
                hop_p50.append(_p50(_unary_raw(echo, "/echo.Echo/UnaryHop", unary_payload, secs)))
                fc_p50.append(_p50(_unary_raw(null, CLASSIFY, unary_payload, secs)))
                sdk_p50.append(_p50(_unary_sdk(null, frame, secs)))
            results["unary"] = {
                "echo_p50_ms": statistics.median(echo_p50),
                "framecast_p50_ms": statistics.median(fc_p50),
                "ratio": _paired_ratio(fc_p50, echo_p50),
                "target": "<= 1.2",
                "echo_thread_hop_p50_ms": statistics.median(hop_p50),
                "ratio_to_thread_hop_echo": _paired_ratio(fc_p50, hop_p50),
                "sdk_client_p50_ms": statistics.median(sdk_p50),
                "per_round_ratios": _round_ratios(fc_p50, echo_p50),
            }
            _show("unary p50 latency (ms), concurrency 1", results["unary"])

            echo_runs, fc_runs, sdk_runs = [], [], []
            for _ in range(args.rounds):
                echo_runs.append(
                    asyncio.run(
                        _stream_raw(echo, "/echo.Echo/Stream", stream_payload, secs, echo_pid)
                    )
                )
                fc_runs.append(
                    asyncio.run(_stream_raw(null, STREAM, stream_payload, secs, null_pid))
                )
                sdk_runs.append(asyncio.run(_stream_sdk(null, stream_request, secs, null_pid)))
            echo_rates = [r for r, _ in echo_runs]
            fc_rates = [r for r, _ in fc_runs]
            results["stream"] = {
                "echo_frames_per_s": statistics.median(echo_rates),
                "framecast_frames_per_s": statistics.median(fc_rates),
                "ratio": _paired_ratio(fc_rates, echo_rates),
                "target": ">= 0.85",
                "echo_server_cpu_us_per_frame": statistics.median(c for _, c in echo_runs),
                "framecast_server_cpu_us_per_frame": statistics.median(c for _, c in fc_runs),
                "sdk_client_frames_per_s": statistics.median(r for r, _ in sdk_runs),
                "per_round_ratios": _round_ratios(fc_rates, echo_rates),
            }
            _show("bidi stream, 8 in flight", results["stream"])

        batch = rng.integers(0, 256, (args.batch, SIZE, SIZE, 3), dtype=np.uint8)
        ort_cmd = serve_command(
            tmp / "onnxruntime.port", cache, "--max-batch", str(args.batch), backend="onnxruntime"
        )
        with running(ort_cmd, tmp / "onnxruntime.port") as (ort_address, _):
            wait_health(ort_address)
            onnx_path = _prepared_onnx(ort_address, cache)
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
