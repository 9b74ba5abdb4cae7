"""Overload, soak and shutdown of a real `framecast serve` process (null backend, loopback).

Usage: uv run python benchmarks/overload_soak.py [--quick] [--json FILE] [--only NAME ...]
       [--serve-flags "..."] [--server-python PYTHON]

Each scenario starts its own server and reports what the issue "Robust under abuse" asks:

* ``overload``: 50 streams (one connection each) send 400 frames each as fast as flow
  control lets them, against ``--max-batch 16 --max-queue 16``. Server RSS at baseline, at
  its peak, and 3 s after the load, without a forced garbage collection; the bound is 1.5 x
  baseline + the memory budget.
* ``burst``: 200 unary calls of 8 images each over 100 connections, 3 rounds, default limits.
  RSS at baseline, at its peak and 5 s after, without a forced collection; the bounds are
  baseline + the memory budget + 200 MB at the peak and baseline + 100 MB after.
* ``connections``: 500 connections each make one call, then close: RSS 5 s after, against
  baseline + 100 MB.
* ``one_connection``: 1,000 streams opened on one connection: how many the server runs at once
  (each sends one frame and waits) against the per-connection limit, and RSS 5 s after they
  end, against baseline + 100 MB.
* ``shared_connection``: unary calls one at a time for 3 s on one connection, alone and then
  beside two streams held open on the same connection: the ratio of the two rates (the target
  is at least 0.5).
* ``disconnects``: 2,000 streams cut abruptly mid-flight; then a good request and the RSS.
* ``soak``: 100,000 frames over 4 streams with 8 in flight each; RSS before and after.
* ``sigterm``: SIGTERM with 50 unary calls and 4 streams in flight: how every call ended
  (answered, refused as shutting down, or cut), how the streams ended, the exit code and the
  time to exit against the grace period. A stream whose client is still writing when the
  server ends it may be reported by grpc.aio's client as INTERNAL "Internal error from Core"
  instead of the server's UNAVAILABLE (grpc/grpc#36066); the SDK reconnects on either.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire_format import encode_varint
from framecast_server.process.app import ALL_CALLS_ANSWERED
from framecast_server.settings import ServerSettings
from serve_process import rss_mb, start_server, wait_serving

STREAM = "/framecast.v1.Classifier/ClassifyStream"
CLASSIFY = "/framecast.v1.Classifier/Classify"
DEFAULTS = ServerSettings()  # the scenarios run the server on its default limits
BUDGET_MB = DEFAULTS.memory_budget_bytes / 2**20
GRACE_S = DEFAULTS.grace_s


# One image, serialized once; a frame is its frame_id field followed by these bytes.
_IMAGE = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
_FRAME_TAIL = pb.StreamRequest(image=wire.image_to_proto(_IMAGE)).SerializeToString()
GOOD_REQUEST = wire.classify_request_bytes(_IMAGE[None], top_k=1)
EIGHT_IMAGES = wire.classify_request_bytes(np.stack([_IMAGE] * 8), top_k=1)
# RSS bounds: at the peak of a burst, baseline + budget + PEAK_MARGIN_MB; 5 s after any load,
# baseline + AFTER_MARGIN_MB.
PEAK_MARGIN_MB, AFTER_MARGIN_MB, SETTLE_S = 200, 100, 5.0


def frame(frame_id: int) -> bytes:
    return b"\x08" + encode_varint(frame_id) + _FRAME_TAIL


class Server:
    def __init__(self, cache_dir: Path, tmp: Path, *flags: str, python: str = "") -> None:
        self.port_file, self.log = tmp / "port", tmp / "server.log"
        self.port_file.unlink(missing_ok=True)
        self.process = start_server(cache_dir, self.port_file, self.log, *flags, python=python)
        self.address = wait_serving(self.process, self.port_file)

    def rss(self) -> float:
        return rss_mb(self.process.pid)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def tracebacks(self) -> int:
        return self.log_text().count("Traceback")


@asynccontextmanager
async def channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    # A local subchannel pool: every channel is its own connection.
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as ch:
        yield ch


def stream_call(ch: grpc.aio.Channel, timeout: float | None = None) -> Any:
    return ch.stream_stream(STREAM)(timeout=timeout)  # type: ignore[call-arg]


async def good_request(address: str) -> bool:
    async with channel(address) as ch:
        try:
            await ch.unary_unary(CLASSIFY)(GOOD_REQUEST, timeout=30)  # type: ignore[call-arg]
        except grpc.RpcError:
            return False
    return True


async def sample_rss(server: Server, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], server.rss())
        await asyncio.sleep(0.1)


async def warm(server: Server) -> float:
    for _ in range(20):
        await good_request(server.address)
    await asyncio.sleep(1.0)
    return server.rss()


# --- scenarios -------------------------------------------------------------------------------


async def overload(server: Server, streams: int, frames: int) -> dict[str, Any]:
    baseline = await warm(server)
    peak = [baseline]
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(server, peak, stop))
    outcomes: collections.Counter[str] = collections.Counter()

    async def one(index: int) -> None:
        async with channel(server.address) as ch:
            call = stream_call(ch, timeout=600)

            async def send() -> None:
                for i in range(frames):
                    await call.write(frame(index * frames + i + 1))
                await call.done_writing()

            sender = asyncio.ensure_future(send())
            async for raw in call:
                response = pb.StreamResponse.FromString(raw)
                outcomes["frame ok" if response.HasField("classification") else "frame error"] += 1
            await sender
            outcomes[f"stream {(await call.code()).name}"] += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(streams)))
    seconds = time.monotonic() - started
    stop.set()
    await sampler
    await asyncio.sleep(3.0)  # idle, no forced collection
    after = server.rss()
    bound = 1.5 * baseline + BUDGET_MB
    return {
        "streams": streams,
        "frames_per_stream": frames,
        "seconds": round(seconds, 1),
        "frames_per_s": round(streams * frames / seconds),
        "outcomes": dict(outcomes),
        "rss_baseline_mb": round(baseline),
        "rss_peak_mb": round(peak[0]),
        "rss_after_mb": round(after),
        "rss_bound_mb": round(bound),
        "within_bound": after <= bound and peak[0] <= bound,
    }


async def burst(server: Server, connections: int, calls: int, rounds: int) -> dict[str, Any]:
    baseline = await warm(server)
    peak = [baseline]
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(server, peak, stop))
    outcomes: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    channels = [
        grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(connections)
    ]
    try:
        methods = [ch.unary_unary(CLASSIFY) for ch in channels]  # type: ignore[call-arg]

        async def one(index: int) -> None:
            try:
                await methods[index % connections](EIGHT_IMAGES, timeout=120)
                outcomes["OK"] += 1
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1

        for _ in range(rounds):
            await asyncio.gather(*(one(i) for i in range(calls)))
    finally:
        await asyncio.gather(*(ch.close(None) for ch in channels))
    seconds = time.monotonic() - started
    stop.set()
    await sampler
    await asyncio.sleep(SETTLE_S)  # idle, no forced collection
    after = server.rss()
    peak_bound = baseline + BUDGET_MB + PEAK_MARGIN_MB
    after_bound = baseline + AFTER_MARGIN_MB
    return {
        "connections": connections,
        "calls_per_round": calls,
        "rounds": rounds,
        "seconds": round(seconds, 1),
        "outcomes": dict(outcomes),
        "rss_baseline_mb": round(baseline),
        "rss_peak_mb": round(peak[0]),
        "rss_after_mb": round(after),
        "rss_peak_bound_mb": round(peak_bound),
        "rss_after_bound_mb": round(after_bound),
        "within_bound": peak[0] <= peak_bound and after <= after_bound,
    }


async def connections_close(server: Server, count: int) -> dict[str, Any]:
    baseline = await warm(server)
    channels = [
        grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(count)
    ]
    outcomes: collections.Counter[str] = collections.Counter()
    try:

        async def one(ch: grpc.aio.Channel) -> None:
            try:
                await ch.unary_unary(CLASSIFY)(GOOD_REQUEST, timeout=60)  # type: ignore[call-arg]
                outcomes["OK"] += 1
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1

        await asyncio.gather(*(one(ch) for ch in channels))
        peak = server.rss()
    finally:
        await asyncio.gather(*(ch.close(None) for ch in channels))
    await asyncio.sleep(SETTLE_S)
    after = server.rss()
    return {
        "connections": count,
        "outcomes": dict(outcomes),
        "rss_baseline_mb": round(baseline),
        "rss_open_mb": round(peak),
        "rss_after_mb": round(after),
        "rss_after_bound_mb": round(baseline + AFTER_MARGIN_MB),
        "within_bound": after <= baseline + AFTER_MARGIN_MB,
    }


async def one_connection(server: Server, streams: int) -> dict[str, Any]:
    baseline = await warm(server)
    answered_by = time.monotonic() + 3.0
    answered = 0
    release = asyncio.Event()
    async with channel(server.address) as ch:
        # One call first, so the server's settings (its stream limit) have reached the client:
        # streams opened before that race them and may be refused (REFUSED_STREAM).
        await ch.unary_unary(CLASSIFY)(GOOD_REQUEST, timeout=30)  # type: ignore[call-arg]

        async def one(index: int) -> bool:
            call = stream_call(ch, timeout=120)
            await call.write(frame(index + 1))
            raw = await call.read()
            early = time.monotonic() < answered_by and raw is not grpc.aio.EOF  # type: ignore[attr-defined]
            await release.wait()
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
            return early

        tasks = [asyncio.ensure_future(one(i)) for i in range(streams)]
        await asyncio.sleep(3.0)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    answered = sum(1 for r in results if r is True)
    errors = [r for r in results if isinstance(r, BaseException)]
    failed = len(errors)
    if errors:
        print(f"one_connection: {failed} streams failed, e.g. {errors[0]!r}", file=sys.stderr)
    good = await good_request(server.address)
    await asyncio.sleep(SETTLE_S)
    after = server.rss()
    return {
        "streams_opened": streams,
        "running_at_once": answered,
        "failed": failed,
        "good_request_after": good,
        "rss_baseline_mb": round(baseline),
        "rss_after_mb": round(after),
        "rss_after_bound_mb": round(baseline + AFTER_MARGIN_MB),
        "within_bound": after <= baseline + AFTER_MARGIN_MB,
    }


async def shared_connection(server: Server, seconds: float = 3.0) -> dict[str, Any]:
    async with channel(server.address) as ch:
        classify = ch.unary_unary(CLASSIFY)  # type: ignore[call-arg]
        await classify(GOOD_REQUEST, timeout=30)

        async def rate() -> float:
            count, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                await classify(GOOD_REQUEST, timeout=30)
                count += 1
            return count / seconds

        alone = await rate()
        streams = [stream_call(ch, timeout=120) for _ in range(2)]
        for index, call in enumerate(streams):
            await call.write(frame(index + 1))
            await call.read()  # open and served; held open from here on
        beside = await rate()
        for call in streams:
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                pass
    return {
        "unary_per_s_alone": round(alone),
        "unary_per_s_beside_two_streams": round(beside),
        "ratio": round(beside / alone, 2),
    }


async def disconnects(server: Server, count: int) -> dict[str, Any]:
    baseline = await warm(server)
    semaphore = asyncio.Semaphore(20)

    async def one(index: int) -> None:
        async with semaphore:
            ch = grpc.aio.insecure_channel(
                server.address, options=[("grpc.use_local_subchannel_pool", 1)]
            )
            call = stream_call(ch, timeout=60)
            for i in range(4):
                await call.write(frame(index * 4 + i + 1))
            await call.read()
            await ch.close(grace=None)  # abrupt: the call is cancelled mid-flight

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    seconds = time.monotonic() - started
    await asyncio.sleep(2.0)
    return {
        "disconnects": count,
        "seconds": round(seconds, 1),
        "good_request_after": await good_request(server.address),
        "rss_before_mb": round(baseline),
        "rss_after_mb": round(server.rss()),
    }


async def soak(server: Server, frames: int, streams: int = 4, window: int = 8) -> dict[str, Any]:
    baseline = await warm(server)
    per_stream = frames // streams
    answered = collections.Counter[str]()

    async def one(index: int) -> None:
        async with channel(server.address) as ch:
            call = stream_call(ch, timeout=3600)
            room = asyncio.Semaphore(window)

            async def send() -> None:
                for i in range(per_stream):
                    await room.acquire()
                    await call.write(frame(index * per_stream + i + 1))
                await call.done_writing()

            sender = asyncio.ensure_future(send())
            async for raw in call:
                room.release()
                response = pb.StreamResponse.FromString(raw)
                answered["ok" if response.HasField("classification") else "error"] += 1
            await sender

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(streams)))
    seconds = time.monotonic() - started
    return {
        "frames": per_stream * streams,
        "answered": dict(answered),
        "seconds": round(seconds, 1),
        "frames_per_s": round(per_stream * streams / seconds),
        "rss_before_mb": round(baseline),
        "rss_after_mb": round(server.rss()),
    }


async def sigterm(server: Server, calls: int, streams: int) -> dict[str, Any]:
    await warm(server)
    stop_sending = asyncio.Event()
    unary: collections.Counter[str] = collections.Counter()
    stream_ends: collections.Counter[str] = collections.Counter()
    stream_answers: collections.Counter[int] = collections.Counter()  # by camera
    gaps = 0
    loaded = asyncio.Event()  # every stream and the unary callers have been answered

    def note_answer() -> None:
        if len(stream_answers) >= streams and unary["answered OK"] >= calls:
            loaded.set()

    async def caller(ch: grpc.aio.Channel) -> None:
        classify = ch.unary_unary(CLASSIFY)  # type: ignore[call-arg]
        while True:
            try:
                await classify(GOOD_REQUEST, timeout=30)
                unary["answered OK"] += 1
                note_answer()
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                if code is grpc.StatusCode.UNAVAILABLE and "shutting down" in details:
                    # What the status asks: go elsewhere (a real client would fail over).
                    unary["refused: shutting down"] += 1
                    return
                if code is grpc.StatusCode.UNAVAILABLE and stop_sending.is_set():
                    unary["not received: server gone"] += 1
                    return
                if ALL_CALLS_ANSWERED in server.log_text():
                    # Sent after the server had answered every call and stopped admitting (a
                    # client slower than the server's quiet period, on a busy machine): no
                    # handler ever had it, so it was not cut. The server writes the line
                    # before it closes the port, so a call it cut fails before the line.
                    unary["not received: server gone"] += 1
                    return
                unary[f"cut: {code.name} {details[:60]}"] += 1
                return

    async def camera(index: int) -> None:
        nonlocal gaps
        async with channel(server.address) as ch:
            call = stream_call(ch, timeout=120)
            room = asyncio.Semaphore(8)

            async def send() -> None:
                i = 0
                try:
                    while True:
                        await room.acquire()
                        i += 1
                        await call.write(frame(index * 10**9 + i))
                except (grpc.RpcError, asyncio.InvalidStateError, asyncio.CancelledError):
                    return

            sender = asyncio.ensure_future(send())
            expected = index * 10**9 + 1
            try:
                async for raw in call:
                    room.release()
                    stream_answers[index] += 1
                    note_answer()
                    response = pb.StreamResponse.FromString(raw)
                    if response.frame_id != expected:
                        gaps += 1
                    expected = response.frame_id + 1
            except grpc.RpcError:
                pass
            sender.cancel()
            code = await call.code()
            details = await call.details()
            stream_ends[f"{code.name}: {(details or '')[:70]}"] += 1

    async with channel(server.address) as ch:
        tasks = [asyncio.ensure_future(caller(ch)) for _ in range(calls)]
        tasks += [asyncio.ensure_future(camera(i)) for i in range(streams)]
        # Under load: at least 2 s, and until every stream and the unary callers are answered
        # (a busy machine takes longer to get there), so SIGTERM lands on work in flight.
        await asyncio.sleep(2.0)
        with contextlib.suppress(asyncio.TimeoutError):  # what was reached is reported
            await asyncio.wait_for(loaded.wait(), 60)
        at_sigterm = {
            "unary_answered": unary["answered OK"],
            "streams_answered": len(stream_answers),
        }
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(server.process.wait, 60)
        exited_s = time.monotonic() - started
        stop_sending.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
    cut = sum(n for k, n in unary.items() if k.startswith("cut"))
    return {
        "unary_calls_in_flight": calls,
        "streams": streams,
        "before_sigterm": at_sigterm,
        "unary": dict(unary),
        "unary_cut": cut,
        "stream_ends": dict(stream_ends),
        "stream_gaps": gaps,
        "exit_code": exit_code,
        "exit_s": round(exited_s, 2),
        "grace_s": GRACE_S,
    }


# --- driver ----------------------------------------------------------------------------------

Scenario = Callable[[Server], Coroutine[Any, Any, dict[str, Any]]]


def scenarios(quick: bool) -> dict[str, tuple[tuple[str, ...], Scenario]]:
    q = 10 if quick else 1
    return {
        "overload": (
            ("--max-batch", "16", "--max-queue", "16"),
            lambda s: overload(s, streams=50 // (5 if quick else 1), frames=400 // q),
        ),
        "burst": ((), lambda s: burst(s, connections=100 // q, calls=200 // q, rounds=3)),
        "connections": ((), lambda s: connections_close(s, count=500 // q)),
        "one_connection": ((), lambda s: one_connection(s, streams=1000 // q)),
        "shared_connection": ((), shared_connection),
        "disconnects": ((), lambda s: disconnects(s, count=2000 // q)),
        "soak": ((), lambda s: soak(s, frames=100_000 // (50 if quick else 1))),
        "sigterm": ((), lambda s: sigterm(s, calls=50, streams=4)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small numbers (a smoke test)")
    parser.add_argument("--only", nargs="*", help="run these scenarios only")
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--serve-flags", default="", help="more `framecast serve` flags for every scenario"
    )
    parser.add_argument(
        "--server-python", default="", help="run the server with this Python (e.g. main's)"
    )
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cache_dir = args.cache_dir or tmp / "engines"
        for name, (flags, scenario) in scenarios(args.quick).items():
            if args.only and name not in args.only:
                continue
            server = Server(
                cache_dir, tmp, *flags, *args.serve_flags.split(), python=args.server_python
            )
            try:
                result = asyncio.run(scenario(server))
            finally:
                code = server.stop()
            result.setdefault("exit_code", code)
            result["tracebacks_in_log"] = server.tracebacks()
            results[name] = result
            print(f"{name}: {json.dumps(result)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
