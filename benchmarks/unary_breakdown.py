"""Where one unary Classify request's time goes: an instrumented `framecast serve` process.

Used by benchmarks/serving_overhead.py. The server runs as ``framecast serve --backend null``
with timers wrapped around the stages of a unary request (no code of the server changes):

* the whole handler (the servicer's Classify, from its entry to its return);
* parsing and validation of the request (bytes -> the [N, H, W, 3] array and top_k);
* admission to the batcher (limits, queue, the request's future);
* batch dispatch and delivery on the event loop (taking a batch, handing it to the inference
  thread; its results posted back and set on the requests' futures);
* the inference thread's work per batch (the null backend's infer and the output copy);
* result filling (top-k and the response) and response serialization.

The wait inside the handler (the hand-off to the inference thread and back) is the handler's
wall time less its own stages. The CPU outside every stage (gRPC's C core and its poller
thread, the event loop, thread wake-ups) is the process's CPU time from /proc less the stages.
Timers are plain ``perf_counter_ns`` pairs (well under a microsecond each) and cover the stages
that exist in the code being measured, so the same script profiles the code before and after a
change; a stage the code does not have is reported as absent.

The driver talks to the instrumented process through a FIFO: each line written to it makes the
process write its cumulative totals (JSON) to the stats file.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from framecast_client.connections import OWN_CONNECTION_OPTION
from serve_process import connections_for, cpu_seconds, running, serve_command, wait_health

# Stage name -> candidate (module, class or None, attribute): the first that exists is timed.
CANDIDATES: dict[str, list[tuple[str, str | None, str]]] = {
    "parse": [
        ("framecast_server.service.classifier", "ClassifierServicer", "_parse_classify"),
    ],
    "admit": [("framecast_server.core.batcher", "Batcher", "submit_nowait")],
    "dispatch": [
        ("framecast_server.core.batcher", "Batcher", "_dispatch_soon_now"),
        ("framecast_server.core.batcher", "Batcher", "_on_batch_done"),
    ],
    "compute": [
        ("framecast_server.core.batching.workers", "InferenceThreads", "_compute"),
        ("framecast_server.core.batcher", "Batcher", "_compute"),
    ],
    "fill": [
        ("framecast_server.service.classifier", "ClassifierServicer", "_respond"),
        ("framecast_server.service.classifier", "ClassifierServicer", "_fill_result"),
    ],
}
LABELS = {
    "parse": "parsing + validation",
    "admit": "admission to the batcher",
    "wait": "wait: hand-off to the inference thread and back (wall)",
    "fill": "result filling",
    "serialize": "response serialization",
    "dispatch": "batch dispatch + delivery on the loop",
    "compute": "inference thread: null infer + output copy",
    "handler": "whole handler, entry to return (wall)",
    "outside": "outside every stage: gRPC, event loop, wake-ups (CPU)",
    "cpu": "server process CPU per request (/proc)",
}


class _Totals:
    """Wall and thread CPU nanoseconds, and calls, per stage (from the loop and the worker)."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.cpu_ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def add(self, stage: str, ns: int, cpu_ns: int) -> None:
        with self.lock:
            self.ns[stage] = self.ns.get(stage, 0) + ns
            self.cpu_ns[stage] = self.cpu_ns.get(stage, 0) + cpu_ns
            self.calls[stage] = self.calls.get(stage, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"ns": dict(self.ns), "cpu_ns": dict(self.cpu_ns), "calls": dict(self.calls)}


TOTALS = _Totals()


def _timed(stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
    # Wall time, and the calling thread's CPU time: on 2 shared cores a stage's wall time also
    # holds whatever ran while its thread was preempted (the client, gRPC's poller).
    clock, cpu_clock, add = time.perf_counter_ns, time.thread_time_ns, TOTALS.add
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return await function(*args, **kwargs)
            finally:
                add(stage, clock() - started, 0)  # spans awaits: wall time only

        return timed_async

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started, cpu_started = clock(), cpu_clock()
        try:
            return function(*args, **kwargs)
        finally:
            add(stage, clock() - started, cpu_clock() - cpu_started)

    return timed


def instrument() -> list[str]:
    """Wrap the stages' functions and Classify's handler; returns what was wrapped."""
    import importlib

    wrapped: list[str] = []
    for stage, candidates in CANDIDATES.items():
        for module_name, class_name, attribute in candidates:
            try:
                owner: Any = importlib.import_module(module_name)
            except ModuleNotFoundError:
                continue  # a candidate of another version of the server
            if class_name is not None:
                owner = getattr(owner, class_name, None)
            function = getattr(owner, attribute, None) if owner is not None else None
            if function is None:
                continue
            if isinstance(inspect.getattr_static(owner, attribute), staticmethod):
                setattr(owner, attribute, staticmethod(_timed(stage, function)))
            else:
                setattr(owner, attribute, _timed(stage, function))
            wrapped.append(f"{stage}: {class_name}.{attribute}")
            break  # the first that exists: a later one may run inside it (counted twice)
    # Classify is a unary call registered request-streaming (it waits for admission unread).
    for name in ("unary_unary_rpc_method_handler", "stream_unary_rpc_method_handler"):
        setattr(grpc, name, _timed_handler(getattr(grpc, name)))
    return wrapped


def _timed_handler(original: Any) -> Any:
    def handler(
        behavior: Any, request_deserializer: Any = None, response_serializer: Any = None
    ) -> Any:
        if getattr(behavior, "__name__", "") == "Classify":
            behavior = _timed("handler", behavior)
            if response_serializer is not None:
                response_serializer = _timed("serialize", response_serializer)
        return original(behavior, request_deserializer, response_serializer)

    return handler


def _serve_instrumented(fifo: Path, stats: Path, argv: list[str]) -> int:
    wrapped = instrument()

    def answer() -> None:
        while True:
            with fifo.open() as requests:
                for _ in requests:
                    snapshot = TOTALS.snapshot() | {"wrapped": wrapped}
                    partial = stats.with_suffix(".tmp")
                    partial.write_text(json.dumps(snapshot))
                    partial.replace(stats)

    threading.Thread(target=answer, daemon=True).start()
    from framecast_client.cli import main

    return main(argv)


# ---------------------------------------------------------------- the driver's side
@contextmanager
def instrumented_server(tmp: Path, cache: Path) -> Iterator[tuple[str, Callable[[], Any]]]:
    """An instrumented null server; yields its address and a function reading (totals, cpu)."""
    fifo, stats, port_file = tmp / "breakdown.fifo", tmp / "breakdown.json", tmp / "prof.port"
    os.mkfifo(fifo)
    serve = serve_command(port_file, cache, "--max-batch", "32")
    command = [sys.executable, __file__, str(fifo), str(stats), *serve[3:]]
    with running(command, port_file, tmp / "breakdown.log") as (address, pid):
        wait_health(address)

        def read() -> tuple[dict[str, Any], float]:
            before = stats.stat().st_mtime_ns if stats.exists() else 0
            with fifo.open("w") as pipe:
                pipe.write("\n")
            deadline = time.monotonic() + 10
            while not stats.exists() or stats.stat().st_mtime_ns == before:
                if time.monotonic() > deadline:
                    raise RuntimeError("the instrumented server did not answer")
                time.sleep(0.01)
            return json.loads(stats.read_text()), cpu_seconds(pid)

        yield address, read


def per_request(
    before: tuple[dict[str, Any], float], after: tuple[dict[str, Any], float]
) -> dict[str, float]:
    """Microseconds per request of each stage between two readings (absent stages left out)."""
    (t0, cpu0), (t1, cpu1) = before, after
    requests = int(t1["calls"].get("handler", 0) - t0["calls"].get("handler", 0))
    if requests <= 0:
        raise RuntimeError("no request reached the instrumented handler")

    def us(stage: str, key: str = "cpu_ns") -> float | None:
        if stage not in t1[key]:
            return None
        spent = int(t1[key][stage] - t0[key].get(stage, 0))
        return float(spent) / requests / 1000

    stages = ("parse", "admit", "fill", "serialize", "dispatch", "compute")
    figures = {stage: us(stage) for stage in stages}
    # The stages' CPU, but wall times for the handler and the wait inside it; a stage that
    # awaits (the old async parse) has only its wall time.
    for stage in ("parse",):
        if figures[stage] == 0.0:
            figures[stage] = us(stage, "ns")
    figures["handler"] = us("handler", "ns")
    on_loop = sum(us(s, "ns") or 0.0 for s in ("parse", "admit", "fill"))
    figures["wait"] = (figures["handler"] or 0.0) - on_loop
    on_loop = sum(figures[s] or 0.0 for s in ("parse", "admit", "fill"))
    cpu = (cpu1 - cpu0) / requests * 1e6
    staged = on_loop + sum(figures[s] or 0.0 for s in ("serialize", "dispatch", "compute"))
    figures["outside"] = cpu - staged
    figures["cpu"] = cpu
    batches = t1["calls"].get("compute", 0) - t0["calls"].get("compute", 0)
    result = {k: round(v, 1) for k, v in figures.items() if v is not None}
    result["requests"] = requests
    result["mean_batch"] = round(requests / batches, 2) if batches else 0.0
    return result


def show(title: str, figures: dict[str, float]) -> None:
    """Print one breakdown: a line per stage, microseconds per request."""
    print(title)
    order = ("handler", "parse", "admit", "wait", "fill", "serialize", "dispatch", "compute")
    for key in (*order, "outside", "cpu"):
        if key in figures:
            print(f"  {LABELS[key]:<56} {figures[key]:>8.1f} us")
    print(
        f"  {'requests measured, mean batch':<56} {figures['requests']:>8} {figures['mean_batch']}"
    )


def median_breakdown(runs: list[dict[str, float]]) -> dict[str, float]:
    """Stage by stage, the median over rounds."""
    return {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}


async def _gather_unary(call: Any, payload: bytes, seconds: float, concurrency: int) -> None:
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop_at:
            await call(payload, timeout=10)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def load(address: str, method: str, payload: bytes, seconds: float, concurrency: int) -> None:
    """Unary calls of ``payload`` with ``concurrency`` outstanding, for ``seconds``."""

    async def run() -> None:
        # As protocols.unary_rate: Framecast's default calls per connection on each.
        count = connections_for(concurrency)
        options = [OWN_CONNECTION_OPTION]
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(count)]
        calls = [channel.unary_unary(method, None, None) for channel in channels]
        try:
            await asyncio.gather(
                *(_gather_unary(call, payload, seconds, concurrency // count) for call in calls)
            )
        finally:
            for channel in channels:
                await channel.close(None)

    asyncio.run(run())


if __name__ == "__main__":
    # benchmarks/unary_breakdown.py FIFO STATS serve ARGS...: the instrumented server.
    sys.exit(_serve_instrumented(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
