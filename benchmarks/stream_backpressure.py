"""Backpressure that saves bandwidth: realtime cameras at 2x overload, with and without hints.

Usage: uv run python benchmarks/stream_backpressure.py [--cameras 4] [--fps 30]
       [--overload 2] [--seconds 8] [--rounds 2] [--max-age-ms 150] [--json FILE]

One server process on the null backend slowed to a fixed time per image, so that it computes
``cameras * fps / overload`` frames/s (the null backend has no delay option; the slowed
backend is this script's own, started with ``--serve``). In this process, ``--cameras``
realtime sessions each capture ``--fps`` frames/s of 640x480 (open loop, like cameras) and
stream them. Three ways, alternating within each round:

* ``drop-oldest``: today's realtime session without the server's hint (``follow_hints=False``)
  and no max age: every frame captured is prepared; the oldest unsent one is dropped.
* ``drop-oldest+max-age``: the same with ``max_age``: the server drops frames that grew too old.
* ``hints+max-age``: the session follows the server's rate hint and skips frames at capture,
  before preparing and sending them.

Reported per way: frames answered (classified) per second, bytes sent per answered frame,
client CPU (this process: capture, preprocessing, gRPC) per answered frame, the p99 frame age
at compute as the server states it, client-side p99 latency, and the drops (skipped at capture,
dropped on the client, dropped by the server for their age).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from framecast_client import Client, StreamResult
from numpy.typing import NDArray
from serve_process import running

WAYS: dict[str, dict[str, Any]] = {
    "drop-oldest": {"follow_hints": False, "max_age": False},
    "drop-oldest+max-age": {"follow_hints": False, "max_age": True},
    "hints+max-age": {"follow_hints": True, "max_age": True},
}


class SlowNullBackend:
    """The null backend taking a fixed time per image, as a saturated accelerator would."""

    def __init__(self, per_image_s: float) -> None:
        from framecast_server.backends.null import NullBackend

        self._inner = NullBackend(max_batch=32)
        self._per_image_s = per_image_s
        self.info = self._inner.info
        self.max_batch = self._inner.max_batch
        self.max_concurrent_batches = 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        time.sleep(self._per_image_s * len(images))
        return self._inner.infer(images)

    def close(self) -> None:
        self._inner.close()


def serve(port_file: Path, per_image_ms: float) -> None:
    """The server process: a slowed null backend on a free port until SIGTERM."""
    from framecast_server.process.background import BackgroundServer
    from framecast_server.settings import ServerSettings

    settings = ServerSettings(
        port=0, backend="null", allow_download=False, max_batch=32, cache_dir=port_file.parent
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    backend = SlowNullBackend(per_image_ms / 1000)
    with BackgroundServer(settings, backend_factory=lambda _path: backend) as server:
        port_file.write_text(f"{server.port}\n")
        stop.wait()


def camera(
    fps: float, seconds: float, frames: list[NDArray[np.uint8]]
) -> Iterator[NDArray[np.uint8]]:
    """Frames at ``fps`` for ``seconds``, open loop: a late frame is not made up for."""
    start = time.monotonic()
    i = 0
    while (now := time.monotonic()) < start + seconds:
        due = start + i / fps
        if due > now:
            time.sleep(due - now)
        yield frames[i % len(frames)]
        i = max(i + 1, int((time.monotonic() - start) * fps))


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def run_way(address: str, way: str, args: argparse.Namespace) -> dict[str, Any]:
    """All cameras streaming one way for ``--seconds``; the figures of that run."""
    options = WAYS[way]
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(8)]
    results: list[list[StreamResult]] = [[] for _ in range(args.cameras)]
    with Client(address) as client:
        client.model_info()
        sessions = [
            client.stream(
                camera(args.fps, args.seconds, frames),
                mode="realtime",
                follow_hints=options["follow_hints"],
                max_age=args.max_age_ms / 1000 if options["max_age"] else None,
                name=f"cam-{i}",
            )
            for i in range(args.cameras)
        ]
        cpu_start = time.process_time()
        wall_start = time.monotonic()

        def drain(i: int) -> None:
            results[i].extend(sessions[i])

        threads = [threading.Thread(target=drain, args=(i,)) for i in range(args.cameras)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu = time.process_time() - cpu_start
        wall = time.monotonic() - wall_start
        stats = [session.stats for session in sessions]
        for session in sessions:
            session.close()
    every = [r for per_camera in results for r in per_camera]
    answered = [r for r in every if r.ok]
    stale = sum(1 for r in every if r.error is not None and r.error.drop_reason)
    n = max(1, len(answered))
    return {
        "way": way,
        "read": sum(s.read for s in stats),
        "sent": sum(s.sent for s in stats),
        "answered": len(answered),
        "answered_per_s": len(answered) / wall,
        "skipped_at_capture": sum(s.skipped for s in stats),
        "dropped_on_client": sum(s.dropped - s.skipped for s in stats),
        "dropped_stale_on_server": stale,
        "bytes_sent_per_answered": sum(s.bytes_sent for s in stats) / n,
        "client_cpu_ms_per_answered": cpu * 1000 / n,
        "p99_age_ms": p99([r.age_ms for r in answered if r.age_ms is not None]),
        "p99_latency_ms": p99([r.latency_ms for r in answered]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cameras", type=int, default=4)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--overload", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-age-ms", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--per-image-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.per_image_ms)
        return 0
    capacity = args.cameras * args.fps / args.overload
    per_image_ms = 1000 / capacity
    with tempfile.TemporaryDirectory() as tmp:
        port_file = Path(tmp) / "port"
        command = [
            sys.executable, __file__, "--serve", str(port_file),
            "--per-image-ms", str(per_image_ms),
        ]  # fmt: skip
        env_note = f"{os.cpu_count()} CPUs"
        with running(command, port_file, Path(tmp) / "server.log") as (address, _pid):
            with Client(address, timeout=300) as client:
                client.model_info()  # serving
            runs: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}
            for round_ in range(args.rounds):
                order = list(WAYS) if round_ % 2 == 0 else list(reversed(WAYS))
                for way in order:
                    runs[way].append(run_way(address, way, args))
    print(
        f"{args.cameras} cameras x {args.fps:g} fps = {args.cameras * args.fps:g} frames/s "
        f"offered; server computes {capacity:g} frames/s ({per_image_ms:.1f} ms/image, "
        f"{args.overload:g}x overload); max age {args.max_age_ms} ms; {args.rounds} rounds "
        f"of {args.seconds:g} s; medians over rounds; {env_note}"
    )
    keys = [
        "answered_per_s", "bytes_sent_per_answered", "client_cpu_ms_per_answered",
        "p99_age_ms", "p99_latency_ms", "skipped_at_capture", "dropped_on_client",
        "dropped_stale_on_server",
    ]  # fmt: skip
    summary = {
        way: {key: statistics.median(r[key] for r in rows) for key in keys}
        for way, rows in runs.items()
    }
    print(
        f"{'way':<22} {'answered/s':>10} {'KB sent/ans':>11} {'CPU ms/ans':>10} "
        f"{'p99 age ms':>10} {'p99 lat ms':>10} {'skipped':>8} {'cl drops':>8} {'stale':>6}"
    )
    for way, s in summary.items():
        print(
            f"{way:<22} {s['answered_per_s']:>10.1f} {s['bytes_sent_per_answered'] / 1024:>11.1f} "
            f"{s['client_cpu_ms_per_answered']:>10.2f} {s['p99_age_ms']:>10.1f} "
            f"{s['p99_latency_ms']:>10.1f} {s['skipped_at_capture']:>8.0f} "
            f"{s['dropped_on_client']:>8.0f} {s['dropped_stale_on_server']:>6.0f}"
        )
    base, hinted = summary["drop-oldest+max-age"], summary["hints+max-age"]
    print(
        "hints against drop-oldest (both with max age): bytes per answered frame x"
        f"{hinted['bytes_sent_per_answered'] / base['bytes_sent_per_answered']:.2f}, client "
        f"CPU per answered frame x"
        f"{hinted['client_cpu_ms_per_answered'] / base['client_cpu_ms_per_answered']:.2f}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
