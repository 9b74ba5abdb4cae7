"""Worker scaling, in one run: frames/s and server CPU per frame against `--workers N`.

Usage: uv run python benchmarks/worker_scaling.py [--workers 1,2,4,8] [--seconds 3] [--out FILE]

For each N, `framecast serve --workers N` runs in its own process tree and a load generator in
separate processes drives it: many connections (the kernel spreads connections over the
workers, SO_REUSEPORT), one bidi stream on each with a window of frames in flight, the same
pre-built 150,528-byte frame request, replies not parsed. Reported per N: frames/s, that
against N times one worker's (the scaling efficiency; the target on a 16-core host with the
null backend is at least 0.8 up to N = 8), the server's CPU per frame (all its processes, from
/proc) and the client's.

Where the host has the cores, the server gets N cores and the clients the others (CPU
affinity); where it does not (N + client cores > cores), both share all cores and the table
says so: the figures then show how the host splits its cores, not how the server scales.
`--backend onnxruntime` runs the real ResNet-50 instead of the null backend: there each
worker's ONNX Runtime gets its share of the cores (the model design README explains).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.wire import image_to_proto
from framecast_server.process.cores import usable_cores
from serve_process import tree_cpu_seconds

SIZE = 224
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


async def _drive(
    address: str, request: bytes, connections: int, window: int, start: float, end: float
) -> int:
    """Frames answered between ``start`` and ``end`` (monotonic) over ``connections`` streams."""
    counted = 0

    async def one_stream() -> None:
        nonlocal counted
        # Its own connection (channels of equal settings would share one).
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            call = channel.stream_stream(
                "/framecast.v1.Classifier/ClassifyStream",
                request_serializer=None,
                response_deserializer=None,
            )()  # type: ignore[call-arg]  # grpc.aio: no iterator, write() instead
            room = asyncio.Semaphore(window)

            async def write() -> None:
                while time.monotonic() < end:
                    await room.acquire()
                    await call.write(request)
                await call.done_writing()

            writer = asyncio.ensure_future(write())
            async for _ in call:
                room.release()
                if start <= time.monotonic() < end:
                    counted += 1
            await writer

    await asyncio.gather(*(one_stream() for _ in range(connections)))
    return counted


def _client_process(
    args: tuple[str, bytes, int, int, float, float, list[int] | None],
) -> tuple[int, float]:
    """One load-generating process: (frames counted, its CPU seconds)."""
    address, request, connections, window, start, end, cores = args
    if cores:
        os.sched_setaffinity(0, cores)
    before = time.process_time()
    counted = asyncio.run(_drive(address, request, connections, window, start, end))
    return counted, time.process_time() - before


def _serve(workers: int, backend: str, cache: Path, tmp: Path, cores: list[int] | None) -> Any:
    port_file = Path(tempfile.mkdtemp(dir=tmp)) / "port"
    command = [
        sys.executable, "-m", "framecast_client.cli", "serve", "--workers", str(workers),
        "--port", "0", "--port-file", str(port_file), "--backend", backend,
        "--offline", "--cache-dir", str(cache), "--max-queue", "4096",
    ]  # fmt: skip
    own = os.sched_getaffinity(0)
    if cores:
        os.sched_setaffinity(0, cores)  # inherited by the server and its workers
    try:
        process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    finally:
        os.sched_setaffinity(0, own)
    deadline = time.monotonic() + 600
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"framecast serve --workers {workers} did not start")
        time.sleep(0.05)
    return process, f"127.0.0.1:{port_file.read_text().strip()}"


def _request(address: str) -> bytes:
    deadline = time.monotonic() + 600
    with grpc.insecure_channel(address) as channel:
        while True:  # one process listens before its model is loaded (UNAVAILABLE until then)
            try:
                info = pb_grpc.ClassifierStub(channel).GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=60
                )
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    frame = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    request = pb.StreamRequest(
        image=image_to_proto(frame), top_k=1, preprocessing_id=info.preprocessing_id
    )
    return request.SerializeToString()


def measure(
    workers: int, args: argparse.Namespace, cache: Path, tmp: Path, pool: Any
) -> dict[str, Any]:
    cores = sorted(os.sched_getaffinity(0))
    clients = args.clients or max(1, workers)
    pinned = args.pin and len(cores) >= workers + clients
    server_cores = cores[:workers] if pinned else None
    client_cores = cores[workers : workers + clients] if pinned else None
    process, address = _serve(workers, args.backend, cache, tmp, server_cores)
    try:
        request = _request(address)
        start = time.monotonic() + args.warmup
        end = start + args.seconds
        connections = max(1, round(args.connections * workers / clients))
        jobs = [
            (address, request, connections, args.window, start, end,
             [client_cores[i]] if client_cores else None)
            for i in range(clients)
        ]  # fmt: skip
        running = pool.map_async(_client_process, jobs)
        time.sleep(max(0.0, start - time.monotonic()))
        cpu_before = tree_cpu_seconds(process.pid)
        time.sleep(max(0.0, end - time.monotonic()))
        cpu_after = tree_cpu_seconds(process.pid)
        results = running.get(timeout=args.seconds + args.warmup + 120)
    finally:
        process.terminate()
        process.wait(timeout=60)
    frames = sum(counted for counted, _ in results)
    client_cpu = sum(cpu for _, cpu in results)
    return {
        "workers": workers,
        "frames_per_s": frames / args.seconds,
        "server_cpu_us_per_frame": (cpu_after - cpu_before) / max(frames, 1) * 1e6,
        "client_cpu_us_per_frame": client_cpu / max(frames, 1) * 1e6,
        "client_processes": clients,
        "connections": connections * clients,
        "pinned": pinned,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--backend", default="null", choices=("null", "onnxruntime"))
    parser.add_argument("--seconds", type=float, default=3.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--clients", type=int, help="load processes (default: N)")
    parser.add_argument("--connections", type=int, default=4, help="streams per worker")
    parser.add_argument("--window", type=int, default=8, help="frames in flight per stream")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="never pin: server and clients share every core at every N (a like-for-like "
        "comparison on a host too small to pin)",
    )
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache = args.cache_dir or tmp / "cache"
        context = multiprocessing.get_context("spawn")
        with context.Pool(max(args.clients or 0, *counts)) as pool:
            for workers in counts:
                rows.append(measure(workers, args, cache, tmp, pool))
    base = rows[0]["frames_per_s"] / rows[0]["workers"]
    print(
        f"worker scaling, {args.backend} backend, {usable_cores()} usable cores, "
        f"{args.seconds:.0f} s per step, {args.window} frames in flight per stream"
    )
    print("workers  frames/s  x one worker  efficiency  server us/frame  client us/frame  pinned")
    for row in rows:
        row["speedup"] = row["frames_per_s"] / base
        row["efficiency"] = row["speedup"] / row["workers"]
        print(
            f"{row['workers']:>7}  {row['frames_per_s']:>8.0f}  {row['speedup']:>12.2f}  "
            f"{row['efficiency']:>10.2f}  {row['server_cpu_us_per_frame']:>15.0f}  "
            f"{row['client_cpu_us_per_frame']:>15.0f}  {'yes' if row['pinned'] else 'no'}"
        )
    if not all(row["pinned"] for row in rows):
        print(
            "not pinned: server and clients shared the cores (too few for N server cores plus "
            "the clients'); efficiency here shows the host's split, not the server's scaling"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
