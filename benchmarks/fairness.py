"""Fair share between callers: a polite client's latency with and without a greedy neighbour.

Usage: uv run python benchmarks/fairness.py [--seconds 5] [--rounds 3] [--in-flight 200]
       [--greedy-nice N] [--serve-flags "..."] [--json FILE]

One `framecast serve` process (null backend). A polite client sends one frame at a time, on its
own connection. Each round measures it alone (idle), then while a greedy client in another
process keeps ``--in-flight`` unary calls outstanding on one connection (flood). Reported: the
polite client's p50 and p99 in each phase, the ratio of its flood p99 to the idle p99 of the
same round and their median over the rounds (the target is at most 3), how often it saw
RESOURCE_EXHAUSTED (the target is never), and the greedy client's answers and refusals. Both
clients send pre-serialized requests and do not parse the answers, so they cost the machine
little beside the server. On a small machine the greedy client still takes a core from the
server and the polite client; ``--greedy-nice 19`` has it yield, as a client on another host
would.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
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
REQUEST = wire.classify_request_bytes(
    np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8), top_k=1
)


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


def flood_round(address: str, args: argparse.Namespace) -> dict[str, Any]:
    """The polite client alone, then beside a greedy client in another process."""
    idle = polite(address, args.seconds)
    flood = subprocess.Popen(
        ["nice", "-n", str(args.greedy_nice), sys.executable, __file__, "--greedy", address,
         "--in-flight", str(args.in_flight), "--seconds", str(args.seconds + 2)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    time.sleep(1.0)  # the flood is under way
    flooded = polite(address, args.seconds)
    out, _ = flood.communicate(timeout=120)
    return {
        "polite_idle": idle,
        "polite_flooded": flooded,
        "greedy_codes": json.loads(out),
        "p99_ratio": round(flooded["p99_ms"] / idle["p99_ms"], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="idle and flood phases, alternating")
    parser.add_argument("--in-flight", type=int, default=200, help="the greedy client's calls")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--serve-flags", default="", help="more `framecast serve` flags, e.g. limits to try"
    )
    parser.add_argument(
        "--greedy-nice",
        type=int,
        default=0,
        help="run the greedy client at this niceness (19: it yields the CPU to the server and "
        "the polite client, as a client on another host would; default 0)",
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
            rounds = [flood_round(address, args) for _ in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(timeout=60)
    results = {
        "serve_flags": args.serve_flags,
        "greedy_nice": args.greedy_nice,
        "rounds": rounds,
        # Each round's flood p99 against the idle p99 just before it, so drift in the
        # machine's load hits both; the median of the rounds is the figure.
        "p99_ratio": round(statistics.median(r["p99_ratio"] for r in rounds), 2),
        "polite_resource_exhausted": sum(
            r["polite_flooded"]["codes"].get("RESOURCE_EXHAUSTED", 0) for r in rounds
        ),
        "polite_flooded_answers": sum(r["polite_flooded"]["answers"] for r in rounds),
    }
    for i, r in enumerate(rounds, 1):
        for label in ("idle", "flooded"):
            phase = r[f"polite_{label}"]
            print(
                f"round {i} polite {label:8} p50 {phase['p50_ms']:6.2f} ms  "
                f"p99 {phase['p99_ms']:6.2f} ms  {phase['answers']:5} answers  {phase['codes']}"
            )
        print(f"round {i} greedy ({args.in_flight} in flight): {r['greedy_codes']}; "
              f"p99 ratio {r['p99_ratio']}")  # fmt: skip
    print(f"p99 ratio flood/idle, median of {args.rounds} rounds: {results['p99_ratio']} "
          f"(target <= 3); polite RESOURCE_EXHAUSTED: {results['polite_resource_exhausted']} "
          f"(target 0)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
