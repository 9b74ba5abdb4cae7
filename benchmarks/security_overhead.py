"""What TLS, tokens and metrics cost, side by side in one run: stream frames/s against plaintext.

Usage: uv run python benchmarks/security_overhead.py [--seconds 2] [--rounds 5] [--out FILE]

Four `framecast serve` processes (null backend, so the serving path is all there is to
measure), each in its own process as in production:

- plain: plaintext, no tokens, no metrics (the baseline);
- tls: TLS only;
- tokens+metrics: plaintext with a token file and the Prometheus endpoint on;
- all: TLS, tokens and metrics together (the acceptance figure: at most 10% fewer frames/s).

One client for all four: a bidi ClassifyStream keeping 8 frames in flight, sending the same
pre-serialized request bytes and not parsing the replies, so the ratios compare the servers
(TLS costs the client too: its encryption shares the machine's cores, as it would on a camera
talking to its server). Each round runs the four back to back; each ratio is the median of
the per-round ratios, and each server's CPU time per frame comes from /proc.
Certificates are made for the run with `cryptography` (a dev dependency), as the tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire import image_to_proto
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serve_process import cpu_seconds, running, serve_command

ROOT = Path(__file__).resolve().parents[1]
STREAM = "/framecast.v1.Classifier/ClassifyStream"
TOKEN = "benchmark-token"
SIZE = 224
SIDES = ("plain", "tls", "tokens+metrics", "all")


def _certs_module() -> ModuleType:
    """The tests' certificate maker (tests/certs.py), loaded by path: one way to make them."""
    spec = importlib.util.spec_from_file_location("framecast_test_certs", ROOT / "tests/certs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _serve_command(tmp: Path, cache: Path, side: str, certs: Any) -> list[str]:
    command = serve_command(tmp / f"{side}.port", cache, "--max-batch", "32")
    if side in ("tls", "all"):
        command += ["--tls-cert", str(certs.server.cert), "--tls-key", str(certs.server.key)]
    if side in ("tokens+metrics", "all"):
        tokens = tmp / "tokens"
        tokens.write_text(f"bench:{TOKEN}\n")
        command += ["--auth-tokens", str(tokens), "--metrics-port", "0"]
    return command


class Side:
    """How the client reaches one server: channel credentials and call metadata."""

    def __init__(self, name: str, address: str, pid: int, ca: bytes) -> None:
        self.name, self.address, self.pid = name, address, pid
        self.credentials = grpc.ssl_channel_credentials(ca) if name in ("tls", "all") else None
        self.metadata = (
            (("authorization", f"Bearer {TOKEN}"),) if name in ("tokens+metrics", "all") else ()
        )

    def channel(self) -> grpc.aio.Channel:
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.address, options=options)
        return grpc.aio.secure_channel(self.address, self.credentials, options=options)

    async def wait_serving(self) -> None:
        deadline = time.monotonic() + 300
        async with self.channel() as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} server never became SERVING")
                await asyncio.sleep(0.1)


async def _stream_rate(side: Side, payload: bytes, seconds: float, in_flight: int = 8) -> int:
    """Frames answered in `seconds` by one stream keeping `in_flight` frames outstanding."""
    window = asyncio.Semaphore(in_flight)
    stop_at = time.monotonic() + seconds

    async def requests() -> AsyncIterator[bytes]:
        while time.monotonic() < stop_at:
            await window.acquire()
            yield payload

    async with side.channel() as channel:
        call = channel.stream_stream(STREAM, None, None)(requests(), metadata=side.metadata)
        received = 0
        last = b""
        async for reply in call:
            received += 1
            window.release()
            last = reply
    if not pb.StreamResponse.FromString(last).HasField("classification"):
        raise RuntimeError(f"{side.name} answered with an error: {last!r}")
    return received


async def _measure(side: Side, payload: bytes, seconds: float) -> tuple[float, float]:
    """(frames/s, server CPU microseconds per frame), after a short warm-up stream."""
    await _stream_rate(side, payload, 0.3)
    cpu_before = cpu_seconds(side.pid)
    started = time.perf_counter()
    received = await _stream_rate(side, payload, seconds)
    rate = received / (time.perf_counter() - started)
    return rate, (cpu_seconds(side.pid) - cpu_before) / max(received, 1) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement window")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/security_overhead.json")
    )
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    args = parser.parse_args()

    frame = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    payload = pb.StreamRequest(frame_id=1, image=image_to_proto(frame), top_k=1)
    data = payload.SerializeToString()
    rates: dict[str, list[float]] = {name: [] for name in SIDES}
    cpu: dict[str, list[float]] = {name: [] for name in SIDES}

    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        cache = args.cache_dir or tmp / "engines"
        certs = _certs_module().make_certificates(tmp)
        ca = certs.ca.cert.read_bytes()
        sides = []
        for name in SIDES:
            command = _serve_command(tmp, cache, name, certs)
            address, pid = stack.enter_context(running(command, tmp / f"{name}.port"))
            sides.append(Side(name, address, pid, ca))
        for side in sides:
            asyncio.run(side.wait_serving())
        for round_index in range(args.rounds):
            # Rotate the order each round so that no side always runs first or last.
            order = sides[round_index % len(sides) :] + sides[: round_index % len(sides)]
            for side in order:
                rate, us = asyncio.run(_measure(side, data, args.seconds))
                rates[side.name].append(rate)
                cpu[side.name].append(us)

    results: dict[str, Any] = {
        "settings": {"seconds_per_window": args.seconds, "rounds": args.rounds, "in_flight": 8}
    }
    print("bidi stream, 8 in flight, null backend: frames/s and server CPU per frame")
    print(
        f"  {'side':<16} {'frames/s':>10} {'vs plain':>9} {'server us/frame':>16} "
        f"{'vs plain':>9}  frames/s ratio per round"
    )
    for name in SIDES:
        ratios = [a / b for a, b in zip(rates[name], rates["plain"], strict=True)]
        cpu_ratios = [a / b for a, b in zip(cpu[name], cpu["plain"], strict=True)]
        results[name] = {
            "frames_per_s": statistics.median(rates[name]),
            "ratio_to_plain": statistics.median(ratios),
            "server_cpu_us_per_frame": statistics.median(cpu[name]),
            # Server CPU per frame is less sensitive than frames/s to what else the machine runs.
            "cpu_ratio_to_plain": statistics.median(cpu_ratios),
            "per_round_ratios": [round(r, 3) for r in ratios],
        }
        row = results[name]
        print(
            f"  {name:<16} {row['frames_per_s']:>10.0f} {row['ratio_to_plain']:>9.3f} "
            f"{row['server_cpu_us_per_frame']:>16.1f} {row['cpu_ratio_to_plain']:>9.3f}  "
            f"{' '.join(f'{r:.3f}' for r in ratios)}"
        )
    results["all"]["target"] = ">= 0.90"
    print(
        f"TLS + tokens + metrics: {results['all']['ratio_to_plain']:.3f} of plain (target >= 0.90)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
