"""Stream mode: load over one ClassifyStream session instead of unary calls.

A stream session is a pipeline with its own threads (reader, preprocessing, receiver), not a
"send one, wait" call, so it gets its own step driver. The benchmark feeds the session from
a generator it controls:

* closed loop: the generator yields frame ``i`` only while fewer than ``concurrency`` frames
  are between the generator and their result, so exactly ``concurrency`` frames are in the
  system, as in the unary closed loop; latency runs from the yield to the result;
* open loop: the generator yields frame ``i`` at its scheduled time (or as soon as the
  session takes it, if later); latency runs from the scheduled time.

The session is opened lossless (every frame gets one result, in order) with reconnection
off: a broken stream is a benchmark error, not something to ride out. The session
preprocesses every frame on its own thread; the frames it gets are carriers its
preprocessing only slices (see ``sessions.stream_payloads``), so that work is small, but it
is part of the measured latency (in "network", the part the server's timing does not cover).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from framecast_client.types import Classification

from framecast_bench.inputs import Payload
from framecast_bench.report import StepResult
from framecast_bench.runner import (
    Arrival,
    BenchUnavailableError,
    Clock,
    StepConfig,
    _measure,
    _record,
    _Shared,
    arrival_offsets,
    closed_step_result,
    error_name,
    open_step_result,
)
from framecast_bench.stats import Window

#: Opens a session over ``frames`` with ``max_in_flight`` outstanding frames; the session is
#: an iterable of results carrying ``index`` (position in ``frames``) and ``outcome`` (a
#: Classification, or an error with a ``code``), and has ``close()``.
StreamOpener = Callable[[Iterable[Any], int], Any]


def client_stream_opener(client: Any, *, top_k: int) -> StreamOpener:
    """A StreamOpener on ``client.stream`` (lossless, no reconnection)."""

    def open_stream(frames: Iterable[Any], max_in_flight: int) -> Any:
        try:
            return client.stream(
                frames, mode="lossless", max_in_flight=max_in_flight, top_k=top_k, reconnect=False
            )
        except TypeError as exc:
            raise BenchUnavailableError(
                f"Client.stream does not take the arguments stream mode uses ({exc})"
            ) from exc

    return open_stream


class _Feed:
    """The generator side: which frame was due when, and the closed-loop gate."""

    def __init__(self, shared: _Shared, limit: int | None, clock: Clock) -> None:
        self.shared = shared
        self.clock = clock
        self.lock = threading.Lock()
        self.due: dict[int, float] = {}  # at most max-in-system entries: popped on result
        self.gate = threading.Semaphore(limit) if limit is not None else None

    def closed_frames(self) -> Iterator[Any]:
        assert self.gate is not None
        shared, n = self.shared, len(self.shared.payloads)
        for i in range(shared.budget):
            while not self.gate.acquire(timeout=0.05):
                if shared.stop.is_set():
                    return
            if shared.stop.is_set() or self.clock() >= shared.deadline:
                return
            with self.lock:
                self.due[i] = self.clock()
            yield shared.payloads[i % n].batch[0]

    def open_frames(self, start: float, schedule: Sequence[float]) -> Iterator[Any]:
        shared, n = self.shared, len(self.shared.payloads)
        for i, offset in enumerate(schedule):
            due = start + offset
            delay = due - self.clock()
            if (delay > 0 and shared.stop.wait(delay)) or shared.stop.is_set():
                return
            if self.clock() >= shared.deadline:
                return
            with self.lock:
                self.due[i] = due
            yield shared.payloads[i % n].batch[0]

    def take(self, index: int) -> float | None:
        with self.lock:
            due = self.due.pop(index, None)
        if self.gate is not None:
            self.gate.release()
        return due


def _consume(shared: _Shared, feed: _Feed, session: Any) -> None:
    clock = feed.clock
    try:
        for result in session:
            done = clock()
            due = feed.take(int(result.index))
            if due is None:
                continue  # not a frame of ours: nothing to measure it against
            payload = shared.payloads[int(result.index) % len(shared.payloads)]
            outcome = result.outcome
            if isinstance(outcome, Classification):
                # The session does not say when a frame left; count it as sent when due.
                _record(shared.recorder, payload, [outcome], due=due, sent=due, done=done)
            else:
                code = getattr(outcome, "code", None)
                shared.recorder.record_error(getattr(code, "name", type(outcome).__name__))
            if shared.stop.is_set():
                return
    except Exception as exc:  # the session ended with an error: a data point, then stop
        shared.recorder.record_error(error_name(exc))


def _run(
    open_stream: StreamOpener,
    payloads: Sequence[Payload],
    config: StepConfig,
    max_in_flight: int,
    frames: Callable[[_Feed, float], Iterator[Any]],
    limit: int | None,
    clock: Clock,
) -> tuple[list[Window], bool, float]:
    start = clock() + 0.05
    shared = _Shared.for_step(payloads, config, start, clock)
    feed = _Feed(shared, limit, clock)
    session = open_stream(frames(feed, start), max_in_flight)
    consumer = threading.Thread(
        target=_consume, args=(shared, feed, session), name="bench-stream", daemon=True
    )
    consumer.start()
    try:
        windows, stable = _measure(shared, [consumer], config, start, clock)
        return windows, stable, start
    finally:
        shared.stop.set()
        session.close()
        consumer.join(timeout=config.drain_timeout_s)


def run_stream_closed_step(
    open_stream: StreamOpener,
    payloads: Sequence[Payload],
    concurrency: int,
    config: StepConfig,
    clock: Clock = time.perf_counter,
) -> StepResult:
    """``concurrency`` frames in the system at all times, over one stream session."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    windows, stable, _ = _run(
        open_stream,
        payloads,
        config,
        concurrency,
        lambda feed, _start: feed.closed_frames(),
        concurrency,
        clock,
    )
    return closed_step_result(windows, stable, config, concurrency)


def run_stream_open_step(
    open_stream: StreamOpener,
    payloads: Sequence[Payload],
    rate: float,
    config: StepConfig,
    *,
    max_inflight: int = 64,
    arrival: Arrival = "poisson",
    rng: np.random.Generator | None = None,
    clock: Clock = time.perf_counter,
) -> StepResult:
    """Frames on a schedule of ``rate`` per second fixed in advance, latency from it."""
    offsets = arrival_offsets(rate, config, arrival, rng)
    windows, stable, start = _run(
        open_stream,
        payloads,
        config,
        max_inflight,
        lambda feed, start: feed.open_frames(start, offsets),
        None,
        clock,
    )
    return open_step_result(windows, stable, config, rate, start, offsets)
