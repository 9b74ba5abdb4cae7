"""Fair share between callers: a polite client's latency with and without a greedy neighbour.

Usage: uv run python benchmarks/fairness.py [--seconds 5] [--rounds 3] [--in-flight 200]
       [--connections 1] [--isolation both|pinned|shared] [--greedy-nice N]
       [--serve-flags "..."] [--server-python PYTHON] [--json FILE]
       uv run python benchmarks/fairness.py --alone [--connections 8] [--in-flight 16]
       [--baseline-python PYTHON] [--baseline-flags "..."]

One `framecast serve` process (null backend, tokens required). The greedy and polite clients
are two callers: each has its own token. A polite client sends one frame at a time, on its
own connection. Each round measures it alone (idle), then while a greedy client in another
process keeps ``--in-flight`` unary calls outstanding over ``--connections`` connections
(flood). Reported: the polite client's p50 and p99 in each phase, the ratio of its flood p99
to the idle p99 of the same round and their median over the rounds (the target is at most 3),
how often it saw RESOURCE_EXHAUSTED (the target is never), and the greedy client's answers
and refusals. Both clients send pre-serialized requests and do not parse the answers, so they
cost the machine little beside the server.

Isolation: on one machine the greedy client takes CPU from the server and the polite client,
which a client on another host would not. ``pinned`` models the other host: the machine's
CPUs are split in two halves (on 2 cores, one each); the server and the polite client share
the first half, and the greedy client runs on the other half, so it floods at full speed and
takes none of the server's CPU (its idle phase is measured pinned the same way). ``shared``
is the plain figure: everything on every CPU, the greedy client at ``--greedy-nice``. With
``both`` (the default) each round measures both, in alternating order, and each is reported
as the median of its rounds. Run it alone on the machine (e.g. under a CPU lock).

``--alone``: no polite client; the greedy client alone, its requests per second in each round
(a caller alone must still get the whole server). With ``--baseline-python`` (e.g. a main
checkout's ``.venv/bin/python``) and/or ``--baseline-flags``, a second server runs beside the
first and the rounds alternate between the two: the ratio is this server's req/s over the
baseline's, median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from framecast_client import wire
from serve_process import serve_command, wait_serving

CLASSIFY = "/framecast.v1.Classifier/Classify"
TOKENS = {"greedy": "greedy-secret", "polite": "polite-secret"}
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
    metadata = (("authorization", f"Bearer {TOKENS['polite']}"),)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(CLASSIFY)  # type: ignore[call-arg]
        call(REQUEST, timeout=30, metadata=metadata)  # connected and warm
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                call(REQUEST, timeout=30, metadata=metadata)
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


async def greedy(address: str, in_flight: int, connections: int, seconds: float) -> dict[str, Any]:
    """``in_flight`` calls outstanding at all times over ``connections``, for ``seconds``."""
    codes: collections.Counter[str] = collections.Counter()
    metadata = (("authorization", f"Bearer {TOKENS['greedy']}"),)
    # Each channel its own connection (channels with equal settings would share one).
    channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(connections)
    ]
    try:
        calls = [channel.unary_unary(CLASSIFY) for channel in channels]  # type: ignore[call-arg]
        await asyncio.gather(*(call(REQUEST, timeout=30, metadata=metadata) for call in calls))
        end = time.monotonic() + seconds

        async def loop(call: Any) -> None:
            while time.monotonic() < end:
                try:
                    await call(REQUEST, timeout=30, metadata=metadata)
                    codes["OK"] += 1
                except grpc.RpcError as error:
                    codes[error.code().name] += 1

        started = time.monotonic()
        await asyncio.gather(*(loop(calls[i % connections]) for i in range(in_flight)))
        elapsed = time.monotonic() - started
    finally:
        await asyncio.gather(*(channel.close(None) for channel in channels))
    return {**codes, "per_s": round(codes["OK"] / elapsed, 1)}


ISOLATIONS = {"both": ("pinned", "shared"), "pinned": ("pinned",), "shared": ("shared",)}


def cpu_halves() -> tuple[set[int], set[int]]:
    """This process's CPUs in two halves: the server's and the polite client's, the greedy's."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("fairness.py: --isolation pinned needs at least 2 CPUs")
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` onto ``cpus`` (threads started later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def greedy_process(
    address: str, args: argparse.Namespace, seconds: float, cpus: set[int] | None = None
) -> subprocess.Popen[str]:
    """The greedy client in a process of its own, at ``--greedy-nice``, on ``cpus`` if given."""
    pinned = ["--greedy-cpus", ",".join(map(str, sorted(cpus)))] if cpus else []
    return subprocess.Popen(
        ["nice", "-n", str(args.greedy_nice), sys.executable, __file__, "--greedy", address,
         "--in-flight", str(args.in_flight), "--connections", str(args.connections),
         "--seconds", str(seconds), *pinned],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def flood_round(
    address: str, server_pid: int, isolation: str, args: argparse.Namespace
) -> dict[str, Any]:
    """The polite client alone, then beside a greedy client in another process.

    ``pinned``: the server and this (polite) process on one half of the CPUs, the greedy
    client on the other; ``shared``: all on every CPU.
    """
    everything = os.sched_getaffinity(0)
    ours, greedy_cpus = cpu_halves() if isolation == "pinned" else (everything, None)
    pin(server_pid, ours)
    os.sched_setaffinity(0, ours)
    try:
        idle = polite(address, args.seconds)
        flood = greedy_process(address, args, args.seconds + 2, greedy_cpus)
        time.sleep(1.0)  # the flood is under way
        flooded = polite(address, args.seconds)
        out, _ = flood.communicate(timeout=120)
    finally:
        os.sched_setaffinity(0, everything)
        pin(server_pid, everything)
    return {
        "isolation": isolation,
        "polite_idle": idle,
        "polite_flooded": flooded,
        "greedy_codes": json.loads(out),
        "p99_ratio": round(flooded["p99_ms"] / idle["p99_ms"], 2),
    }


@contextmanager
def server(
    tmp: Path, name: str, cache_dir: Path, flags: str, python: str = sys.executable
) -> Iterator[tuple[str, int]]:
    """A `framecast serve` (null backend, the two tokens) run by ``python``: (address, pid)."""
    tokens = tmp / "tokens"
    tokens.write_text("".join(f"{who}:{token}\n" for who, token in TOKENS.items()))
    port_file, log = tmp / f"{name}.port", tmp / f"{name}.log"
    command = serve_command(
        port_file, cache_dir, "--auth-tokens", str(tokens), *flags.split(), python=python
    )
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield wait_serving(process, port_file), process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)


def alone(args: argparse.Namespace, tmp: Path, cache_dir: Path) -> dict[str, Any]:
    """The greedy caller alone: req/s per round, beside a baseline server if one is given."""
    # --server-python names "this" side here too: without it a comparison of two other trees
    # silently measured this checkout against the baseline.
    sides = {"this": (args.server_python or sys.executable, args.serve_flags)}
    if args.baseline_python or args.baseline_flags:
        sides["baseline"] = (args.baseline_python or sys.executable, args.baseline_flags)
    with contextlib.ExitStack() as stack:
        addresses = {
            name: stack.enter_context(server(tmp, name, cache_dir, flags, python))[0]
            for name, (python, flags) in sides.items()
        }
        rounds: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            entry = {}
            for name, address in addresses.items():
                out, _ = greedy_process(address, args, args.seconds).communicate(timeout=120)
                entry[name] = json.loads(out)
            rounds.append(entry)
    results: dict[str, Any] = {"sides": sides, "rounds": rounds}
    for i, r in enumerate(rounds, 1):
        print(f"round {i}: " + "; ".join(f"{name} {codes}" for name, codes in r.items()))
    if "baseline" in sides:
        ratios = [r["this"]["per_s"] / r["baseline"]["per_s"] for r in rounds]
        results["ratio"] = round(statistics.median(ratios), 3)
        print(f"alone, {args.in_flight} calls over {args.connections} connections: req/s this "
              f"over baseline, median of {args.rounds} rounds: {results['ratio']} "
              f"(rounds {[round(x, 3) for x in ratios]}; target >= 0.95)")  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="idle and flood phases, alternating")
    parser.add_argument("--in-flight", type=int, default=200, help="the greedy client's calls")
    parser.add_argument(
        "--connections", type=int, default=1, help="the greedy client's connections (default 1)"
    )
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--serve-flags", default="", help="more `framecast serve` flags, e.g. limits to try"
    )
    parser.add_argument(
        "--isolation",
        choices=sorted(ISOLATIONS),
        default="both",
        help="pinned: the greedy client on CPUs of its own, as on another host; shared: "
        "everything on every CPU; both (default): each round measures both",
    )
    parser.add_argument(
        "--greedy-nice",
        type=int,
        default=0,
        help="run the greedy client at this niceness (with --isolation shared; default 0)",
    )
    parser.add_argument(
        "--alone", action="store_true", help="the greedy client alone: its requests per second"
    )
    parser.add_argument(
        "--baseline-python", help="with --alone: a second server run by this Python (e.g. main's)"
    )
    parser.add_argument(
        "--baseline-flags", default="", help="with --alone: the second server's serve flags"
    )
    parser.add_argument(
        "--server-python", help="run the server with this Python (e.g. a main checkout's)"
    )
    parser.add_argument("--greedy", metavar="ADDRESS", help=argparse.SUPPRESS)  # child role
    parser.add_argument("--greedy-cpus", help=argparse.SUPPRESS)  # the child's CPUs
    args = parser.parse_args()
    if args.greedy:
        if args.greedy_cpus:
            os.sched_setaffinity(0, {int(cpu) for cpu in args.greedy_cpus.split(",")})
        codes = asyncio.run(greedy(args.greedy, args.in_flight, args.connections, args.seconds))
        print(json.dumps(codes))
        return 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache_dir = args.cache_dir or tmp / "engines"
        if args.alone:
            alone_results = alone(args, tmp, cache_dir)
            if args.json:
                args.json.write_text(json.dumps(alone_results, indent=2))
            return 0
        python = args.server_python or sys.executable
        isolations = ISOLATIONS[args.isolation]
        with server(tmp, "server", cache_dir, args.serve_flags, python) as (address, pid):
            # Alternating order, so drift in the machine's load hits both alike.
            rounds = [
                flood_round(address, pid, isolation, args)
                for i in range(args.rounds)
                for isolation in (isolations if i % 2 == 0 else isolations[::-1])
            ]
    results: dict[str, Any] = {
        "serve_flags": args.serve_flags,
        "greedy_nice": args.greedy_nice,
        "greedy_connections": args.connections,
        "rounds": rounds,
        # Each round's flood p99 against the idle p99 just before it, so drift in the
        # machine's load hits both; the median of the rounds is the figure, per isolation.
        "p99_ratio": {
            isolation: round(
                statistics.median(r["p99_ratio"] for r in rounds if r["isolation"] == isolation),
                2,
            )
            for isolation in isolations
        },
        "polite_resource_exhausted": sum(
            r["polite_flooded"]["codes"].get("RESOURCE_EXHAUSTED", 0) for r in rounds
        ),
        "polite_flooded_refused": sum(
            sum(n for code, n in r["polite_flooded"]["codes"].items() if code != "OK")
            for r in rounds
        ),
        "polite_flooded_answers": sum(r["polite_flooded"]["answers"] for r in rounds),
    }
    for n, r in enumerate(rounds):
        i = n // len(isolations) + 1
        for label in ("idle", "flooded"):
            phase = r[f"polite_{label}"]
            print(
                f"round {i} {r['isolation']:6} polite {label:8} p50 {phase['p50_ms']:6.2f} ms  "
                f"p99 {phase['p99_ms']:6.2f} ms  {phase['answers']:5} answers  {phase['codes']}"
            )
        print(f"round {i} {r['isolation']:6} greedy ({args.in_flight} in flight over "
              f"{args.connections} connections): {r['greedy_codes']}; "
              f"p99 ratio {r['p99_ratio']}")  # fmt: skip
    for isolation, ratio in results["p99_ratio"].items():
        print(f"p99 ratio flood/idle, {isolation}, median of {args.rounds} rounds: {ratio} "
              f"(target <= 3)")  # fmt: skip
    print(f"polite calls not OK: {results['polite_flooded_refused']} (target 0)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
