"""Serving overhead, side by side in one run: Framecast vs raw gRPC echo (and Triton), served vs
in-process.

Usage: uv run python benchmarks/serving_overhead.py [--seconds 2] [--rounds 5]
       [--triton-python PY] [--no-onnxruntime] [--baseline-tree DIR ...] [--out FILE]

Servers run in their own processes (as in production: client and server do not share a GIL):

* ``echo``: grpc.aio with generic handlers on bytes, on the same event loop as Framecast's
  server (uvloop where available); it does not parse the request and answers a 64-byte
  reply: the cheapest possible server for the same request bytes. Its ``UnaryHop`` method
  also hops through one worker thread per request and does nothing else: the floor for any
  server that keeps inference off its event loop, as Framecast does.
* ``framecast``: ``framecast serve --backend null``.
* ``baseline``, with ``--baseline-tree DIR`` (repeatable: ``baseline2``...): ``framecast serve
  --backend null`` of another checkout (``git worktree add DIR <commit>``, then ``uv sync``
  there), run by that checkout's own ``.venv`` with this checkout's calls per connection:
  before and after a change, measured in the same run, side by side.
* ``triton``: a local Triton where one can run: tritonserver 2.51.0 (bundled by nvidia-pytriton
  0.7.0), python backend null model, no PyTriton proxy (benchmarks/triton_local.py; its Python
  given by ``--triton-python``); skipped with the reason printed where it cannot run.

Measured for each, with the same raw client (pre-serialized request bytes, replies not parsed
but for a check that one is a result), so the servers alone are compared: unary p50 latency at
concurrency 1; unary requests/s and server CPU time per request (from /proc) at concurrency 8
(spread over connections: Framecast runs only a few calls per connection by default);
bidi stream frames/s and server CPU per frame with 8 frames in flight. The SDK's own figures
(``Client.classify_preprocessed``) are reported beside them: its p50, and its client CPU per
request at concurrency 8 against a generated stub's (request built and reply parsed with
protobuf) on the same server.

Then the per-request breakdown of Framecast's unary path (benchmarks/unary_breakdown.py: an
instrumented server process) at concurrency 1 and 8, and ONNX Runtime ResNet-50 served
images/s against the same backend in-process, at the same batch size.

Rounds alternate between the sides (who goes first rotates) so drift in machine load hits all
of them; each figure is the median over rounds, each ratio the median of per-round ratios.
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import unary_breakdown
from framecast_client import Client
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.connections import OWN_CONNECTION_OPTION
from framecast_client.wire import image_to_proto
from framecast_server.process.event_loop import run
from framecast_server.settings import ServerSettings
from protocols import (
    CONNECTIONS,
    MAX_BATCH,
    Side,
    check_framecast,
    maybe_triton,
    stream_rate,
    triton_side,
    unary_p50,
    unary_rate,
)
from serve_process import running, serve_command, wait_health
from triton_local import find_triton_python

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


# ---------------------------------------------------------------- the SDK's own figures
CLASSIFY = "/framecast.v1.Classifier/Classify"
STREAM = "/framecast.v1.Classifier/ClassifyStream"
CONCURRENCY = 8


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


def _client_cost(address: str, frame: np.ndarray, seconds: float, sdk: bool) -> tuple[float, float]:
    """(requests/s, client CPU us per request) of CONCURRENCY threads classifying ``frame``.

    ``sdk``: ``Client.classify_preprocessed`` with ``connections=CONNECTIONS``; else generated
    stubs on as many connections, the request built from the frame and the reply parsed with
    protobuf (what a user of the .proto writes). The servers are other processes, so this
    process's CPU time is the client's.
    """
    options = [
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        OWN_CONNECTION_OPTION,
    ]
    channels = [grpc.insecure_channel(address, options=options) for _ in range(CONNECTIONS)]
    stubs = [pb_grpc.ClassifierStub(channel) for channel in channels]
    with Client(address, timeout=10, connections=CONNECTIONS) as client:
        info = client.model_info()

        def stub_call(index: int) -> object:
            request = pb.ClassifyRequest(
                images=[pb.Image(data=frame[0].tobytes(), height=SIZE, width=SIZE, channels=3)],
                top_k=1,
                preprocessing_id=info.preprocessing_id,
            )
            reply = stubs[index % CONNECTIONS].Classify(request, timeout=10)
            return reply.results[0].predictions[0].label

        def sdk_call(index: int) -> object:
            return client.classify_preprocessed(frame, top_k=1)[0].top.label

        call = sdk_call if sdk else stub_call

        def worker(index: int, stop_at: float) -> int:
            done = 0
            while time.monotonic() < stop_at:
                call(index)
                done += 1
            return done

        try:
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                warm_up = time.monotonic() + 0.3
                list(pool.map(lambda i: worker(i, warm_up), range(CONCURRENCY)))
                cpu, started = time.process_time(), time.perf_counter()
                stop_at = time.monotonic() + seconds
                done = sum(pool.map(lambda i: worker(i, stop_at), range(CONCURRENCY)))
                elapsed = time.perf_counter() - started
                return done / elapsed, (time.process_time() - cpu) / max(done, 1) * 1e6
        finally:
            for channel in channels:
                channel.close()


async def _stream_sdk(address: str, request: pb.StreamRequest, seconds: float) -> float:
    """Frames/s of a protobuf stream client (requests serialized, replies parsed)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        window = asyncio.Semaphore(8)
        stop_at = time.monotonic() + seconds

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            while time.monotonic() < stop_at:
                await window.acquire()
                yield request

        received, started = 0, time.perf_counter()
        async for reply in stub.ClassifyStream(requests()):
            if not reply.HasField("classification"):
                raise RuntimeError(f"Framecast answered with an error: {reply.error}")
            received += 1
            window.release()
        return received / (time.perf_counter() - started)


def _check_echo(reply: bytes, stream: bool) -> None:
    if reply != ECHO_REPLY:
        raise RuntimeError("the echo server answered something else")


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


def _side_by_side(
    sides: list[Side], hop: Side, frame: np.ndarray, stream_request: pb.StreamRequest, args: Any
) -> dict[str, dict[str, list[float]]]:
    """Every figure of every side, round by round (who goes first rotates)."""
    secs = args.seconds
    names = [s.name for s in sides] + ["hop", "sdk", "stub"]
    keys = ("p50", "rps", "rps_cpu", "client_cpu", "fps", "fps_cpu")
    figures: dict[str, dict[str, list[float]]] = {n: {k: [] for k in keys} for n in names}
    framecast = next(s for s in sides if s.name == "framecast")
    for r in range(args.rounds):
        order = sides[r % len(sides) :] + sides[: r % len(sides)]
        for side in order:
            figures[side.name]["p50"].append(unary_p50(side, secs))
        figures["hop"]["p50"].append(unary_p50(hop, secs))
        figures["sdk"]["p50"].append(_p50(_unary_sdk(framecast.address, frame, secs)))
        for side in order:
            rps, cpu = asyncio.run(unary_rate(side, secs))
            figures[side.name]["rps"].append(rps)
            figures[side.name]["rps_cpu"].append(cpu)
        for name, sdk in (("sdk", True), ("stub", False))[:: 1 if r % 2 else -1]:
            rps, cpu = _client_cost(framecast.address, frame, secs, sdk)
            figures[name]["rps"].append(rps)
            figures[name]["client_cpu"].append(cpu)
        for side in order:
            fps, cpu = asyncio.run(stream_rate(side, secs))
            figures[side.name]["fps"].append(fps)
            figures[side.name]["fps_cpu"].append(cpu)
        figures["sdk"]["fps"].append(
            asyncio.run(_stream_sdk(framecast.address, stream_request, secs))
        )
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return {n: {k: v for k, v in f.items() if v} for n, f in figures.items()}


def _median(figures: dict[str, dict[str, list[float]]], side: str, key: str) -> float | None:
    values = figures.get(side, {}).get(key)
    return statistics.median(values) if values else None


def _report(figures: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """The sections of the JSON output; ratios are medians of per-round ratios."""
    f = figures
    triton = "triton" in f
    report: dict[str, dict[str, Any]] = {}
    unary: dict[str, Any] = {
        "echo_p50_ms": _median(f, "echo", "p50"),
        "framecast_p50_ms": _median(f, "framecast", "p50"),
        "ratio": _paired_ratio(f["framecast"]["p50"], f["echo"]["p50"]),
        "target": "<= Triton's p50",
        "echo_thread_hop_p50_ms": _median(f, "hop", "p50"),
        "ratio_to_thread_hop_echo": _paired_ratio(f["framecast"]["p50"], f["hop"]["p50"]),
        "sdk_client_p50_ms": _median(f, "sdk", "p50"),
        "per_round_ratios": _round_ratios(f["framecast"]["p50"], f["echo"]["p50"]),
    }
    c8: dict[str, Any] = {
        "echo_requests_per_s": _median(f, "echo", "rps"),
        "framecast_requests_per_s": _median(f, "framecast", "rps"),
        "echo_server_cpu_us_per_request": _median(f, "echo", "rps_cpu"),
        "framecast_server_cpu_us_per_request": _median(f, "framecast", "rps_cpu"),
        "cpu_ratio": _paired_ratio(f["framecast"]["rps_cpu"], f["echo"]["rps_cpu"]),
        "cpu_target": "<= 1.2 (framecast / echo)",
        "cpu_per_round_ratios": _round_ratios(f["framecast"]["rps_cpu"], f["echo"]["rps_cpu"]),
    }
    stream: dict[str, Any] = {
        "echo_frames_per_s": _median(f, "echo", "fps"),
        "framecast_frames_per_s": _median(f, "framecast", "fps"),
        "ratio": _paired_ratio(f["framecast"]["fps"], f["echo"]["fps"]),
        "target": ">= 0.85",
        "echo_server_cpu_us_per_frame": _median(f, "echo", "fps_cpu"),
        "framecast_server_cpu_us_per_frame": _median(f, "framecast", "fps_cpu"),
        "sdk_client_frames_per_s": _median(f, "sdk", "fps"),
        "per_round_ratios": _round_ratios(f["framecast"]["fps"], f["echo"]["fps"]),
    }
    sdk: dict[str, Any] = {
        "sdk_requests_per_s": _median(f, "sdk", "rps"),
        "stub_requests_per_s": _median(f, "stub", "rps"),
        "sdk_client_cpu_us_per_request": _median(f, "sdk", "client_cpu"),
        "stub_client_cpu_us_per_request": _median(f, "stub", "client_cpu"),
        "ratio": _paired_ratio(f["sdk"]["client_cpu"], f["stub"]["client_cpu"]),
        "target": "<= 1.3",
        "per_round_ratios": _round_ratios(f["sdk"]["client_cpu"], f["stub"]["client_cpu"]),
    }
    baselines = [name for name in f if name.startswith("baseline")]
    if baselines:
        report["before_after"] = {name: _before_after(f, name) for name in baselines}
    checks: dict[str, Any] = {
        "unary c=8 server CPU framecast/echo <= 1.2": c8["cpu_ratio"] <= 1.2,
        "SDK client CPU / stub's <= 1.3": sdk["ratio"] <= 1.3,
    }
    if triton:
        t = f["triton"]
        unary["triton_p50_ms"] = _median(f, "triton", "p50")
        unary["ratio_to_triton"] = _paired_ratio(f["framecast"]["p50"], t["p50"])
        unary["per_round_ratios_to_triton"] = _round_ratios(f["framecast"]["p50"], t["p50"])
        c8["triton_requests_per_s"] = _median(f, "triton", "rps")
        c8["triton_server_cpu_us_per_request"] = _median(f, "triton", "rps_cpu")
        c8["ratio_to_triton"] = _paired_ratio(f["framecast"]["rps"], t["rps"])
        c8["per_round_ratios_to_triton"] = _round_ratios(f["framecast"]["rps"], t["rps"])
        stream["triton_frames_per_s"] = _median(f, "triton", "fps")
        stream["triton_server_cpu_us_per_frame"] = _median(f, "triton", "fps_cpu")
        stream["ratio_to_triton"] = _paired_ratio(f["framecast"]["fps"], t["fps"])
        stream["per_round_ratios_to_triton"] = _round_ratios(f["framecast"]["fps"], t["fps"])
        checks["unary c=1 p50 framecast <= triton"] = unary["ratio_to_triton"] <= 1.0
        checks["unary c=8 req/s framecast >= triton"] = c8["ratio_to_triton"] >= 1.0
    return report | {"unary": unary, "unary_c8": c8, "stream": stream, "sdk": sdk, "checks": checks}


def _request_reading(payload: bytes, rounds: int) -> dict[str, Any]:
    """Reading a unary request of one raw image into its batch: the server's hand-written
    reader against protobuf's parser, in this process (thread CPU, alternating rounds)."""
    from framecast_server.service.codecs import requests

    def hand_written() -> object:
        request = requests.read_classify_request(payload)
        assert request is not None
        return request.batch(height=SIZE, width=SIZE, max_batch=32)

    def protobuf() -> object:
        request = requests.decode(pb.ClassifyRequest, payload)
        return requests.images_from_proto(request.images, height=SIZE, width=SIZE, max_batch=32)

    figures: dict[str, list[float]] = {"hand_written": [], "protobuf": []}
    for _ in range(rounds):
        for name, read in (("hand_written", hand_written), ("protobuf", protobuf)):
            started, count = time.thread_time_ns(), 2000
            for _ in range(count):
                read()
            figures[name].append((time.thread_time_ns() - started) / count / 1000)
    return {
        "hand_written_us": statistics.median(figures["hand_written"]),
        "protobuf_us": statistics.median(figures["protobuf"]),
        "ratio": _paired_ratio(figures["hand_written"], figures["protobuf"]),
    }


def _before_after(f: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, Any]:
    """This checkout's server against a baseline tree's: figures, and after/before ratios."""
    result: dict[str, Any] = {}
    for key, name in (("p50", "unary_p50_ms"), ("rps", "unary_c8_requests_per_s"),
                      ("fps", "stream_frames_per_s")):  # fmt: skip
        result[f"{name}_before"] = _median(f, baseline, key)
        result[f"{name}_after"] = _median(f, "framecast", key)
        result[f"{name}_after_over_before"] = _paired_ratio(f["framecast"][key], f[baseline][key])
        result[f"{name}_per_round_ratios"] = _round_ratios(f["framecast"][key], f[baseline][key])
    return result


def _table(figures: dict[str, dict[str, list[float]]]) -> str:
    rows = [
        ("unary p50, concurrency 1 (ms)", "p50", "{:.3f}"),
        (f"unary, concurrency {CONCURRENCY} (req/s)", "rps", "{:,.0f}"),
        ("  server CPU per request (us)", "rps_cpu", "{:,.0f}"),
        ("stream, 8 in flight (frames/s)", "fps", "{:,.0f}"),
        ("  server CPU per frame (us)", "fps_cpu", "{:,.0f}"),
    ]
    baselines = [name for name in figures if name.startswith("baseline")]
    sides = ("echo", "hop", "framecast", *baselines, "triton")
    titles = ("raw echo", "echo+hop", "Framecast", *baselines, "Triton")
    lines = [f"{'':<34}" + "".join(f"{n:>12}" for n in titles)]
    for title, key, fmt in rows:
        cells = []
        for name in sides:
            value = _median(figures, name, key)
            cells.append(fmt.format(value) if value is not None else "-")
        lines.append(f"{title:<34}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def _breakdown(tmp: Path, cache: Path, payload: bytes, args: Any) -> dict[str, Any]:
    """Per-request stages of the unary path at concurrency 1 and 8 (medians over rounds)."""
    result: dict[str, Any] = {}
    with unary_breakdown.instrumented_server(tmp, cache) as (address, read):
        for concurrency in (1, CONCURRENCY):
            runs = []
            for _ in range(args.rounds):
                unary_breakdown.load(address, CLASSIFY, payload, 0.3, concurrency)
                before = read()
                unary_breakdown.load(address, CLASSIFY, payload, args.seconds, concurrency)
                runs.append(unary_breakdown.per_request(before, read()))
            figures = unary_breakdown.median_breakdown(runs)
            title = f"unary breakdown, concurrency {concurrency} (us per request, median of rounds)"
            unary_breakdown.show(title, figures)
            result[f"concurrency_{concurrency}"] = figures
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement window")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the ORT ratio")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per figure")
    parser.add_argument("--triton-python", help="a Python with nvidia-pytriton (triton_local.py)")
    parser.add_argument(
        "--no-onnxruntime", action="store_true", help="skip the ONNX Runtime served/in-process part"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/serving_overhead.json")
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="model cache for the servers (default: a temporary one)"
    )
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        action="append",
        default=[],
        help="another checkout (git worktree, uv synced) whose server runs beside this one's",
    )
    parser.add_argument("--echo-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    baseline_pythons = [str(tree / ".venv" / "bin" / "python") for tree in args.baseline_tree]
    for tree, interpreter in zip(args.baseline_tree, baseline_pythons, strict=True):
        if not Path(interpreter).is_file():
            print(
                f"serving_overhead.py: {interpreter} not found: run `uv sync` in {tree} first",
                file=sys.stderr,
            )
            return 2
    if args.echo_server:
        # The same event loop as `framecast serve` (uvloop where available): the two servers
        # differ in what they do per request, not in the loop under it.
        run(_echo_server(args.echo_server))
        return 0

    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    unary_payload = pb.ClassifyRequest(
        images=[image_to_proto(frame[0])], top_k=1
    ).SerializeToString()
    stream_request = pb.StreamRequest(frame_id=1, image=image_to_proto(frame[0]), top_k=1)
    stream_payload = stream_request.SerializeToString()
    results: dict[str, Any] = {
        "settings": {"seconds_per_window": args.seconds, "rounds": args.rounds},
        "triton": None,  # which Triton, when one ran
    }
    python, triton_note = find_triton_python(args.triton_python)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = args.cache_dir or tmp / "engines"
        echo_cmd = [sys.executable, __file__, "--echo-server", str(tmp / "echo.port")]
        null_cmd = serve_command(tmp / "null.port", cache, "--max-batch", str(MAX_BATCH))
        with (
            running(echo_cmd, tmp / "echo.port") as echo,
            running(null_cmd, tmp / "null.port") as null,
            _baselines(baseline_pythons, tmp) as bases,
            maybe_triton(python) as (triton, note),
        ):
            wait_health(null[0])
            triton_note = triton_note or note
            sides = [
                Side("echo", *echo, "/echo.Echo/Unary", unary_payload, "/echo.Echo/Stream",
                     stream_payload, _check_echo),
                Side("framecast", *null, CLASSIFY, unary_payload, STREAM, stream_payload,
                     check_framecast),
            ]  # fmt: skip
            hop = replace(sides[0], name="hop", unary_method="/echo.Echo/UnaryHop")
            for i, (tree, (address, pid)) in enumerate(zip(args.baseline_tree, bases, strict=True)):
                name = f"baseline{i + 1 if i else ''}"
                sides.append(replace(sides[1], name=name, address=address, pid=pid))
                results.setdefault("baseline_trees", {})[name] = str(tree)
            if triton is not None:
                sides.append(triton_side(triton, frame))
                results["triton"] = triton.description
            figures = _side_by_side(sides, hop, frame, stream_request, args)
        results |= _report(figures)
        results["per_round"] = figures
        results["triton_skipped"] = triton_note or None
        print(_table(figures))
        if triton_note:
            print(f"Triton skipped: {triton_note}")
        else:
            print(f"Triton: {results['triton']}")
        _show("unary p50 latency (ms), concurrency 1", results["unary"])
        _show(f"unary, concurrency {CONCURRENCY}", results["unary_c8"])
        _show("bidi stream, 8 in flight", results["stream"])
        _show(f"SDK client cost, concurrency {CONCURRENCY}", results["sdk"])
        for name, figures_vs in results.get("before_after", {}).items():
            _show(f"this checkout vs {name} ({results['baseline_trees'][name]})", figures_vs)
        results["breakdown"] = _breakdown(tmp, cache, unary_payload, args)
        results["request_reading"] = _request_reading(unary_payload, args.rounds)
        _show(
            "reading a raw one-image Classify request (us, thread CPU)", results["request_reading"]
        )
        _show("checks", results["checks"])

        if not args.no_onnxruntime:
            results["onnxruntime"] = _onnxruntime(tmp, cache, rng, args)
            _show(f"ONNX Runtime ResNet-50, batch {args.batch}", results["onnxruntime"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


@contextmanager
def _baselines(pythons: list[str], tmp: Path) -> Iterator[list[tuple[str, int]]]:
    """The baseline checkouts' null servers (each its own Python and model cache).

    Each runs as many calls per connection as this checkout's default, which the load
    generators spread their calls for (an older default would hold calls on the client).
    """
    per_connection = str(ServerSettings().max_streams_per_connection)
    with ExitStack() as stack:
        servers = []
        for i, python in enumerate(pythons):
            port = tmp / f"base{i}.port"
            command = serve_command(
                port, tmp / f"base{i}-engines", "--max-batch", "32",
                "--max-streams-per-connection", per_connection, python=python,
            )  # fmt: skip
            servers.append(stack.enter_context(running(command, port, tmp / f"base{i}.log")))
        for address, _ in servers:
            wait_health(address)
        yield servers


def _onnxruntime(tmp: Path, cache: Path, rng: np.random.Generator, args: Any) -> dict[str, Any]:
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
    return {
        "batch": args.batch,
        "served_images_per_s": statistics.median(served),
        "in_process_images_per_s": statistics.median(local),
        "ratio": statistics.median(served) / statistics.median(local),
        "target": ">= 0.95",
    }


if __name__ == "__main__":
    sys.exit(main())
