"""Protocols side by side in one run: Framecast's own, Framecast's OIP endpoint, a local Triton.

Usage: uv run python benchmarks/protocols.py [--seconds 2] [--rounds 5] [--triton-python PY]
       [--out FILE]

Three servers' sides, each measured with the same raw client (pre-serialized request bytes,
replies not parsed but for a check that the last one is a result, not an error), so the
figures compare the servers, not client libraries:

* ``framecast``: framecast.v1.Classifier (Classify, ClassifyStream) of a ``framecast serve``
  process on the null backend;
* ``oip``: inference.GRPCInferenceService (ModelInfer, ModelStreamInfer) of that same process:
  the same batcher behind another protocol;
* ``triton``: a local Triton, the strongest we can run here: tritonserver 2.51.0 (bundled by
  nvidia-pytriton 0.7.0), python backend null model, no PyTriton proxy: the binary started
  directly on a model repository (benchmarks/triton_local.py). nvidia-pytriton pins numpy<2,
  so it lives in an environment of its own, named by ``--triton-python`` (else
  FRAMECAST_TRITON_PYTHON, else .venv-triton in the repository root); without one, or if
  Triton does not start, the Triton side is skipped and the reason printed.

Every side asks for the top class (Classify top_k=1; OIP's classification extension, k=1).
Measured: unary p50 latency at concurrency 1; unary requests/s at concurrency 8; bidi stream
frames/s with 8 frames in flight; server CPU time per frame on the stream and per request at
concurrency 8 (from /proc, summed over the server's process tree: Triton runs tritonserver and
its python backend's stub). Rounds alternate between the sides so drift in machine load hits
all of them; figures are medians over rounds, ratios medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from framecast_bench import oip_codec as oip
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.connections import OWN_CONNECTION_OPTION
from framecast_client.wire import image_to_proto
from framecast_oip._proto import open_inference_pb2 as oip_pb
from serve_process import connections_for, running, serve_command, tree_cpu_seconds
from triton_local import TritonProcess, bare_triton_process, find_triton_python

ROOT = Path(__file__).resolve().parent
SIZE = 224
IN_FLIGHT = 8
CONCURRENCY = 8
CONNECTIONS = connections_for(CONCURRENCY)  # for the CONCURRENCY unary calls
MODEL = "resnet50"
MAX_BATCH = 32  # Framecast's and Triton's, alike
CLASSIFY = "/framecast.v1.Classifier/Classify"
CLASSIFY_STREAM = "/framecast.v1.Classifier/ClassifyStream"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
LIMIT = 64 * 1024 * 1024
OPTIONS = [("grpc.max_receive_message_length", LIMIT), ("grpc.max_send_message_length", LIMIT)]


@dataclass(frozen=True)
class Side:
    """One protocol endpoint: where it is, what to send, and how to check an answer."""

    name: str
    address: str
    pid: int
    unary_method: str
    unary_payload: bytes
    stream_method: str
    stream_payload: bytes
    check: Callable[[bytes, bool], None]  # (reply, from a stream) -> raises on an error reply


def check_framecast(reply: bytes, stream: bool) -> None:
    if stream:
        message = pb.StreamResponse.FromString(reply)
        if not message.HasField("classification"):
            raise RuntimeError(f"Framecast answered a frame with an error: {message.error}")
    else:
        if not pb.ClassifyResponse.FromString(reply).results[0].predictions:
            raise RuntimeError("Framecast's answer holds no class")


def check_oip(reply: bytes, stream: bool) -> None:
    if stream:
        message = oip_pb.ModelStreamInferResponse.FromString(reply)
        if message.error_message:
            raise RuntimeError(f"the OIP stream answered with an error: {message.error_message}")
        response = message.infer_response
    else:
        response = oip_pb.ModelInferResponse.FromString(reply)
    (result,) = oip.classifications_from_response(response)
    if not result.predictions:
        raise RuntimeError("the OIP answer holds no class")


# ---------------------------------------------------------------- servers (subprocesses)
def _wait_ready(address: str) -> None:
    """Until the OIP endpoint says the model is ready (both servers speak it)."""
    deadline = time.monotonic() + 300
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=300)
        ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelReady",
            request_serializer=oip_pb.ModelReadyRequest.SerializeToString,
            response_deserializer=oip_pb.ModelReadyResponse.FromString,
        )
        while not ready(oip_pb.ModelReadyRequest(name=MODEL), timeout=10).ready:
            if time.monotonic() > deadline:
                raise RuntimeError(f"model {MODEL} at {address} never became ready")
            time.sleep(0.1)


# ---------------------------------------------------------------- the three measurements
def unary_p50(side: Side, seconds: float) -> float:
    with grpc.insecure_channel(side.address, options=OPTIONS) as channel:
        call = channel.unary_unary(side.unary_method, None, None)
        side.check(call(side.unary_payload, timeout=10), False)
        for _ in range(50):
            call(side.unary_payload, timeout=10)
        latencies: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            call(side.unary_payload, timeout=10)
            latencies.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(latencies)


async def unary_rate(side: Side, seconds: float) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request) with CONCURRENCY calls outstanding.

    Spread over CONNECTIONS connections: Framecast runs only a few calls at once per connection
    by default (the others would wait on the client), as the SDK does when given as many.
    """
    options = [*OPTIONS, OWN_CONNECTION_OPTION]
    channels = [
        grpc.aio.insecure_channel(side.address, options=options) for _ in range(CONNECTIONS)
    ]
    try:
        calls = [channel.unary_unary(side.unary_method, None, None) for channel in channels]

        async def worker(index: int, stop_at: float) -> int:
            call = calls[index % CONNECTIONS]
            done = 0
            reply = b""
            while time.monotonic() < stop_at:
                reply = await call(side.unary_payload, timeout=10)
                done += 1
            side.check(reply, False)
            return done

        warm_up = time.monotonic() + 0.3
        await asyncio.gather(*(worker(i, warm_up) for i in range(CONCURRENCY)))
        cpu = tree_cpu_seconds(side.pid)
        started = time.perf_counter()
        stop_at = time.monotonic() + seconds
        done = sum(await asyncio.gather(*(worker(i, stop_at) for i in range(CONCURRENCY))))
        elapsed = time.perf_counter() - started
        return done / elapsed, (tree_cpu_seconds(side.pid) - cpu) / max(done, 1) * 1e6
    finally:
        for channel in channels:
            await channel.close(None)


async def _stream_once(side: Side, seconds: float) -> int:
    window = asyncio.Semaphore(IN_FLIGHT)
    stop_at = time.monotonic() + seconds

    async def requests() -> AsyncIterator[bytes]:
        while time.monotonic() < stop_at:
            await window.acquire()
            yield side.stream_payload

    async with grpc.aio.insecure_channel(side.address, options=OPTIONS) as channel:
        call = channel.stream_stream(side.stream_method, None, None)(requests())
        received = 0
        last = b""
        async for reply in call:
            received += 1
            window.release()
            last = reply
    side.check(last, True)
    return received


async def stream_rate(side: Side, seconds: float) -> tuple[float, float]:
    """(frames/s, server CPU microseconds per frame) of a stream with IN_FLIGHT outstanding."""
    await _stream_once(side, 0.3)
    cpu = tree_cpu_seconds(side.pid)
    started = time.perf_counter()
    received = await _stream_once(side, seconds)
    elapsed = time.perf_counter() - started
    return received / elapsed, (tree_cpu_seconds(side.pid) - cpu) / max(received, 1) * 1e6


# ---------------------------------------------------------------- the run
def _sides(framecast: tuple[str, int], triton: TritonProcess | None) -> list[Side]:
    frame = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    classify = pb.ClassifyRequest(images=[image_to_proto(frame[0])], top_k=1)
    stream = pb.StreamRequest(frame_id=1, image=image_to_proto(frame[0]), top_k=1)
    infer = oip.infer_request(frame, model_name=MODEL, request_id="1", class_count=1)
    sides = [
        Side(
            "framecast", *framecast, CLASSIFY, classify.SerializeToString(),
            CLASSIFY_STREAM, stream.SerializeToString(), check_framecast,
        ),
        Side(
            "oip", *framecast, MODEL_INFER, infer.SerializeToString(),
            MODEL_STREAM_INFER, infer.SerializeToString(), check_oip,
        ),
    ]  # fmt: skip
    if triton is not None:
        sides.append(triton_side(triton, frame))
    return sides


def triton_side(triton: TritonProcess, frame: np.ndarray) -> Side:
    """The local Triton asked for the top class of ``frame`` [1, H, W, 3]."""
    model = triton.endpoints.model
    infer = oip.infer_request(frame, model_name=model, request_id="1", class_count=1)
    payload = infer.SerializeToString()
    address = triton.endpoints.grpc
    return Side(
        "triton", address, triton.pid, MODEL_INFER, payload, MODEL_STREAM_INFER, payload, check_oip
    )


def _measure(sides: list[Side], seconds: float, rounds: int) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {
        s.name: {k: [] for k in ("p50", "rps", "rps_cpu", "fps", "fps_cpu")} for s in sides
    }
    for r in range(rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]  # who goes first rotates
        for side in order:
            figures[side.name]["p50"].append(unary_p50(side, seconds))
        for side in order:
            rps, cpu = asyncio.run(unary_rate(side, seconds))
            figures[side.name]["rps"].append(rps)
            figures[side.name]["rps_cpu"].append(cpu)
        for side in order:
            fps, cpu = asyncio.run(stream_rate(side, seconds))
            figures[side.name]["fps"].append(fps)
            figures[side.name]["fps_cpu"].append(cpu)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return figures


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _table(figures: dict[str, dict[str, list[float]]], triton_note: str) -> str:
    rows = [
        ("unary p50, concurrency 1 (ms)", "p50", "{:.3f}"),
        (f"unary, concurrency {CONCURRENCY} (req/s)", "rps", "{:,.0f}"),
        ("  server CPU per request (us)", "rps_cpu", "{:,.0f}"),
        (f"stream, {IN_FLIGHT} in flight (frames/s)", "fps", "{:,.0f}"),
        ("  server CPU per frame (us)", "fps_cpu", "{:,.0f}"),
    ]
    names = {"framecast": "framecast.v1", "oip": "Framecast OIP", "triton": "Triton python"}
    header = f"{'':<34}" + "".join(f"{names[n]:>16}" for n in ("framecast", "oip", "triton"))
    lines = [header]
    for title, key, fmt in rows:
        cells = []
        for name in ("framecast", "oip", "triton"):
            values = figures.get(name, {}).get(key)
            cells.append(fmt.format(statistics.median(values)) if values else "skipped")
        lines.append(f"{title:<34}" + "".join(f"{c:>16}" for c in cells))
    if triton_note:
        lines.append(f"Triton skipped: {triton_note}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement window")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--triton-python", help="a Python with nvidia-pytriton (triton_local.py)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "protocols.json")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    args = parser.parse_args()

    python, triton_note = find_triton_python(args.triton_python)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = args.cache_dir or tmp / "engines"
        framecast = serve_command(tmp / "framecast.port", cache, "--max-batch", str(MAX_BATCH))
        with running(framecast, tmp / "framecast.port", tmp / "fc.log") as fc:
            _wait_ready(fc[0])
            with maybe_triton(python) as (triton, note):
                triton_note = triton_note or note
                anchor = triton.description if triton is not None else None
                figures = _measure(_sides(fc, triton), args.seconds, args.rounds)

    results: dict[str, object] = {
        "settings": {"seconds_per_window": args.seconds, "rounds": args.rounds},
        "medians": {n: {k: statistics.median(v) for k, v in f.items()} for n, f in figures.items()},
        "per_round": figures,
        "triton": anchor,
        "triton_skipped": triton_note or None,
    }
    oip_vs_framecast = _ratio(figures["oip"]["fps"], figures["framecast"]["fps"])
    checks: dict[str, object] = {
        "oip_stream_fps / framecast_stream_fps": round(oip_vs_framecast, 3),
        "target >= 0.85 (within 15%)": oip_vs_framecast >= 0.85,
    }
    if "triton" in figures:
        oip_vs_triton = _ratio(figures["oip"]["fps"], figures["triton"]["fps"])
        checks["oip_stream_fps / triton_stream_fps"] = round(oip_vs_triton, 3)
        checks["target > 1 (ahead of Triton's python backend)"] = oip_vs_triton > 1.0
    results["checks"] = checks
    print(_table(figures, triton_note))
    if anchor is not None:
        print(f"Triton: {anchor}")
    for key, value in checks.items():
        print(f"{key:<48} {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


@contextmanager
def maybe_triton(python: str | None) -> Iterator[tuple[TritonProcess | None, str]]:
    """The bare local Triton if it starts, else None and why not."""
    if python is None:
        yield None, ""
        return
    started = False
    try:
        with bare_triton_process(python, max_batch_size=MAX_BATCH) as triton:
            started = True
            yield triton, ""
    except RuntimeError as exc:
        if started:
            raise  # a failure while measuring, not a Triton that could not start
        print(f"Triton skipped: {exc}", file=sys.stderr)
        yield None, str(exc)


if __name__ == "__main__":
    sys.exit(main())
