"""Fair share between callers: a polite client's latency with and without a greedy neighbour.

Usage: uv run python benchmarks/fairness.py [--seconds 8] [--in-flight 200] [--json FILE]

One `framecast serve` process (null backend). A polite client sends one frame at a time, on its
own connection, first alone (idle), then while a greedy client in another process keeps
``--in-flight`` unary calls outstanding on one connection (flood), then alone again. Reported:
the polite client's p50 and p99 in each phase, the ratio of its flood p99 to its idle p99 (the
target is at most 3), how often it saw RESOURCE_EXHAUSTED (the target is never), and the greedy
client's answers and refusals. Both clients send pre-serialized requests and do not parse the
answers, so they cost the machine little beside the server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from framecast_client import wire
from serve_process import start_server, wait_serving

CLASSIFY = "/framecast.v1.Classifier/Classify"
REQUEST = wire.classify_request(
    np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8), top_k=1
).SerializeToString()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def polite(address: str, seconds: float) -> dict[str, Any]:
    """One call at a time for ``seconds``: latencies (ms) and status counts."""
    latencies: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(CLASSIFY)  # type: ignore[call-arg]
        call(REQUEST, timeout=30)  # connected and warm
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                call(REQUEST, timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
    return {
        "answers": codes["OK"],
        "codes": dict(codes),
        "p50_ms": round(percentile(latencies, 0.5), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
    }


async def greedy(address: str, in_flight: int, seconds: float) -> dict[str, Any]:
    """``in_flight`` calls outstanding at all times on one connection, for ``seconds``."""
    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(CLASSIFY)  # type: ignore[call-arg]
        await call(REQUEST, timeout=30)
        end = time.monotonic() + seconds

        async def loop() -> None:
            while time.monotonic() < end:
                try:
                    await call(REQUEST, timeout=30)
                    codes["OK"] += 1
                except grpc.RpcError as error:
                    codes[error.code().name] += 1

        await asyncio.gather(*(loop() for _ in range(in_flight)))
    return dict(codes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--in-flight", type=int, default=200, help="the greedy client's calls")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--serve-flags", default="", help="more `framecast serve` flags, e.g. limits to try"
    )
    parser.add_argument("--greedy", metavar="ADDRESS", help=argparse.SUPPRESS)  # child role
    args = parser.parse_args()
    if args.greedy:
        print(json.dumps(asyncio.run(greedy(args.greedy, args.in_flight, args.seconds))))
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port_file, log = tmp / "port", tmp / "server.log"
        server = start_server(
            args.cache_dir or tmp / "engines", port_file, log, *args.serve_flags.split()
        )
        try:
            address = wait_serving(server, port_file)
            idle_before = polite(address, args.seconds)
            flood = subprocess.Popen(
                [sys.executable, __file__, "--greedy", address, "--in-flight",
                 str(args.in_flight), "--seconds", str(args.seconds + 2)],
                stdout=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            time.sleep(1.0)  # the flood is under way
            flooded = polite(address, args.seconds)
            out, _ = flood.communicate(timeout=120)
            greedy_codes = json.loads(out)
            idle_after = polite(address, args.seconds)
        finally:
            server.terminate()
            server.wait(timeout=60)
    idle_p99 = max(idle_before["p99_ms"], idle_after["p99_ms"])
    results = {
        "polite_idle_before": idle_before,
        "polite_flooded": flooded,
        "polite_idle_after": idle_after,
        "greedy": {"in_flight": args.in_flight, "codes": greedy_codes},
        "p99_ratio": round(flooded["p99_ms"] / idle_p99, 2),
        "polite_resource_exhausted": flooded["codes"].get("RESOURCE_EXHAUSTED", 0),
    }
    phases = (("alone", idle_before), ("beside flood", flooded), ("alone again", idle_after))
    for label, phase in phases:
        print(
            f"polite {label:13} p50 {phase['p50_ms']:6.2f} ms  p99 {phase['p99_ms']:6.2f} ms  "
            f"{phase['answers']} answers  {phase['codes']}"
        )
    print(f"greedy ({args.in_flight} in flight): {greedy_codes}")
    print(f"p99 ratio flood/idle: {results['p99_ratio']} (target <= 3); polite RESOURCE_EXHAUSTED: "
          f"{results['polite_resource_exhausted']} (target 0)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
