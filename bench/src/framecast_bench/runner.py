"""The load generator: closed-loop and open-loop steps on worker threads.

Threads with the blocking client, not asyncio: a blocking gRPC call releases the GIL while it
waits, so a thread per in-flight request costs little, and each thread's timestamps are taken
right around its own call rather than whenever an event loop gets to them.

Every step is bounded in time (warm-up plus at most ``max_windows`` windows, then the drain
bounded by the RPC deadline) and in count (``max_requests_per_window`` per window and a total
request budget enforced by the workers themselves).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import grpc
import numpy as np
from framecast_client.errors import RpcError
from framecast_client.types import Classification

from framecast_bench.inputs import Payload
from framecast_bench.report import StepResult
from framecast_bench.schedule import constant_schedule, poisson_schedule
from framecast_bench.stats import Recorder, Window, is_stable, step_result

Mode = Literal["unary", "batch", "stream"]
Arrival = Literal["poisson", "constant"]
Clock = Callable[[], float]


class BenchUnavailableError(RuntimeError):
    """The requested benchmark cannot run with this client or server; the message says why."""


class Session(Protocol):
    """One worker's connection to the server: sends a payload, returns one result per image."""

    def send(self, payload: Payload) -> Sequence[Classification]:
        """Send one request and wait for its results."""
        ...

    def close(self) -> None:
        """Release what the session holds."""
        ...


SessionFactory = Callable[[], Session]


@dataclass(frozen=True)
class StepConfig:
    """How long and how much one load step measures, and when it counts as stable."""

    warmup_s: float = 2.0
    window_s: float = 2.0
    max_windows: int = 10
    stability_windows: int = 3
    stability_tolerance: float = 0.10
    max_requests_per_window: int = 50_000
    drain_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.warmup_s < 0 or self.window_s <= 0:
            raise ValueError("warmup_s must be >= 0 and window_s > 0")
        if self.max_windows < 1 or self.stability_windows < 1:
            raise ValueError("max_windows and stability_windows must be >= 1")
        if self.max_requests_per_window < 1:
            raise ValueError("max_requests_per_window must be >= 1")

    @property
    def max_duration_s(self) -> float:
        """Longest a step's load runs: warm-up plus every window."""
        return self.warmup_s + self.max_windows * self.window_s

    @property
    def hard_stop_s(self) -> float:
        """When workers stop by themselves if the controller has not stopped them.

        One window later than the nominal end: the controller's windows drift a little
        (polling, rotation), and the last window must not lose its load to the backstop.
        """
        return self.max_duration_s + self.window_s + 1.0

    @property
    def request_budget(self) -> int:
        """Most requests a step sends, warm-up included (warm-up gets one window's worth)."""
        return (self.max_windows + 1) * self.max_requests_per_window


@dataclass
class _Shared:
    """State the workers and the controller of one step share."""

    payloads: Sequence[Payload]
    recorder: Recorder
    budget: int
    deadline: float
    stop: threading.Event = field(default_factory=threading.Event)
    # next() on itertools.count is atomic under the GIL: a lock-free ticket dispenser.
    tickets: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    def for_step(
        cls, payloads: Sequence[Payload], config: StepConfig, start: float, clock: Clock
    ) -> _Shared:
        """The state of a step whose load starts at ``start``, bounded as ``config`` says."""
        return cls(
            payloads=payloads,
            recorder=Recorder(clock, config.max_requests_per_window),
            budget=config.request_budget,
            deadline=start + config.hard_stop_s,
        )


def error_name(exc: BaseException) -> str:
    """A failed request's key in the error counts: the status code name, else the type."""
    if isinstance(exc, RpcError):
        return exc.code.name
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if isinstance(code, grpc.StatusCode):
            return code.name
    return type(exc).__name__


def _record(
    recorder: Recorder,
    payload: Payload,
    results: Sequence[Classification],
    *,
    due: float,
    sent: float,
    done: float,
) -> None:
    # The request is done when its slowest image is: take the image whose server time
    # (queue + compute) is largest as the request's server share.
    timings = [r.timing for r in results]
    queue_ms: float | None = None
    compute_ms: float | None = None
    if timings and all(t is not None for t in timings):
        slowest = max(timings, key=lambda t: t.queue_ms + t.compute_ms if t else 0.0)
        assert slowest is not None
        queue_ms, compute_ms = slowest.queue_ms, slowest.compute_ms
    recorder.record_success(
        total_ms=(done - due) * 1000.0,
        client_wait_ms=(sent - due) * 1000.0,
        server_queue_ms=queue_ms,
        server_compute_ms=compute_ms,
        images=payload.images,
        preprocess_ms=payload.preprocess_ms,
    )


def _send_and_record(
    shared: _Shared, session: Session, payload: Payload, due: float, clock: Clock
) -> None:
    sent = clock()
    try:
        results = session.send(payload)
    except Exception as exc:  # every failure is a data point of the benchmark
        shared.recorder.record_error(error_name(exc))
        return
    done = clock()
    if len(results) != payload.images:
        shared.recorder.record_error("WRONG_RESULT_COUNT")
        return
    _record(shared.recorder, payload, results, due=due, sent=sent, done=done)


def _work(
    shared: _Shared, factory: SessionFactory, limit: int, send: Callable[[Session, int], bool]
) -> None:
    """A worker: open a session, then ``send`` for each ticket below ``limit``, then close.

    The loop ends when the step stops, the tickets run out, or ``send`` returns False. A
    session that cannot be opened counts as an error of the step.
    """
    try:
        session = factory()
    except Exception as exc:
        shared.recorder.record_error(error_name(exc))
        return
    try:
        while not shared.stop.is_set():
            ticket = next(shared.tickets)
            if ticket >= limit or not send(session, ticket):
                break
    finally:
        session.close()


def _closed_worker(shared: _Shared, factory: SessionFactory, clock: Clock) -> None:
    n = len(shared.payloads)

    def send(session: Session, ticket: int) -> bool:
        if clock() >= shared.deadline:
            return False
        _send_and_record(shared, session, shared.payloads[ticket % n], clock(), clock)
        return True

    _work(shared, factory, shared.budget, send)


def _open_worker(
    shared: _Shared,
    factory: SessionFactory,
    start: float,
    schedule: Sequence[float],
    clock: Clock,
) -> None:
    n = len(shared.payloads)

    def send(session: Session, ticket: int) -> bool:
        # Latency counts from the scheduled time, not the send: a request that waited
        # for a free worker was late because the system was slow, and that wait is
        # exactly the queueing a closed loop hides.
        due = start + schedule[ticket]
        delay = due - clock()
        if delay > 0 and shared.stop.wait(delay):
            return False
        if clock() >= shared.deadline:
            return False
        _send_and_record(shared, session, shared.payloads[ticket % n], due, clock)
        return True

    _work(shared, factory, min(len(schedule), shared.budget), send)


def _measure(
    shared: _Shared,
    threads: Sequence[threading.Thread],
    config: StepConfig,
    start: float,
    clock: Clock,
    poll_s: float = 0.05,
) -> tuple[list[Window], bool]:
    """Run the controller side of a step: warm-up, windows, stability; then stop and drain."""
    recorder = shared.recorder

    def wait_until(t: float) -> tuple[bool, bool]:
        # (alive, closed by cap): alive is False once every worker has ended (budget spent,
        # or none could connect).
        while clock() < t:
            if not any(th.is_alive() for th in threads):
                return False, False
            if recorder.window_closed.wait(min(poll_s, max(0.0, t - clock()))):
                return True, True
            recorder.flush()
        return True, False

    windows: list[Window] = []
    stable = False
    try:
        warmup_end = start + config.warmup_s
        alive = True
        while alive and clock() < warmup_end:
            alive, _ = wait_until(warmup_end)
            recorder.take_closed()  # warm-up windows closed by the cap: discarded
        recorder.rotate()
        recorder.take_closed()  # the rest of the warm-up: discarded
        while alive and not stable and len(windows) < config.max_windows:
            opened = recorder.current_start()
            alive, by_cap = wait_until(opened + config.window_s)
            if not by_cap:
                recorder.rotate(started=opened)
            for window in recorder.take_closed():
                if stable or len(windows) >= config.max_windows:
                    break
                windows.append(window)
                stable = is_stable(
                    [w.result() for w in windows],
                    config.stability_windows,
                    config.stability_tolerance,
                )
    finally:
        shared.stop.set()
        drain_until = clock() + config.drain_timeout_s
        for th in threads:
            th.join(timeout=max(0.0, drain_until - clock()))
    # Drop a trailing window that ended with the workers (e.g. the budget ran out).
    if windows and not stable and windows[-1].requests == 0:
        windows.pop()
    return windows, stable


def offered_rate(
    start: float, offsets: Sequence[float], windows: Sequence[Window], used: int
) -> float | None:
    """Arrivals per second the schedule offered during the last ``used`` windows."""
    chosen = list(windows[-used:]) if used > 0 else list(windows)
    duration = sum(w.duration_s for w in chosen)
    if duration <= 0:
        return None
    times = start + np.asarray(offsets, dtype=np.float64)
    arrivals = sum(int(((times >= w.start) & (times < w.end)).sum()) for w in chosen)
    return arrivals / duration


def arrival_offsets(
    rate: float, config: StepConfig, arrival: Arrival, rng: np.random.Generator | None
) -> list[float]:
    """When each request of an open-loop step is due, in seconds from the step's start."""
    if arrival == "poisson":
        schedule = poisson_schedule(
            rate, config.hard_stop_s, config.request_budget, rng or np.random.default_rng()
        )
    else:
        schedule = constant_schedule(rate, config.hard_stop_s, config.request_budget)
    return [float(x) for x in schedule]


def _used_windows(windows: Sequence[Window], stable: bool, config: StepConfig) -> int:
    """How many of the last windows the step's result is made of."""
    return config.stability_windows if stable else min(config.stability_windows, len(windows))


def closed_step_result(
    windows: Sequence[Window], stable: bool, config: StepConfig, concurrency: int
) -> StepResult:
    """The result of a closed-loop step that measured ``windows``."""
    used = _used_windows(windows, stable, config)
    return step_result(windows, used=used, stable=stable, loop="closed", concurrency=concurrency)


def open_step_result(
    windows: Sequence[Window],
    stable: bool,
    config: StepConfig,
    rate: float,
    start: float,
    offsets: Sequence[float],
) -> StepResult:
    """The result of an open-loop step at ``rate`` that measured ``windows``."""
    used = _used_windows(windows, stable, config)
    step = step_result(windows, used=used, stable=stable, loop="open", target_rate_rps=rate)
    step.offered_rps = offered_rate(start, offsets, windows, used)
    return step


def run_closed_step(
    factory: SessionFactory,
    payloads: Sequence[Payload],
    concurrency: int,
    config: StepConfig,
    clock: Clock = time.perf_counter,
) -> StepResult:
    """``concurrency`` workers, each sending its next request as soon as the last returns."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    start = clock()
    shared = _Shared.for_step(payloads, config, start, clock)
    threads = [
        threading.Thread(
            target=_closed_worker, args=(shared, factory, clock), name=f"bench-c{i}", daemon=True
        )
        for i in range(concurrency)
    ]
    for th in threads:
        th.start()
    windows, stable = _measure(shared, threads, config, start, clock)
    return closed_step_result(windows, stable, config, concurrency)


def run_open_step(
    factory: SessionFactory,
    payloads: Sequence[Payload],
    rate: float,
    config: StepConfig,
    *,
    max_inflight: int = 64,
    arrival: Arrival = "poisson",
    rng: np.random.Generator | None = None,
    clock: Clock = time.perf_counter,
) -> StepResult:
    """Requests sent on a schedule of ``rate`` per second fixed in advance.

    At most ``max_inflight`` requests are outstanding (one per worker thread); when all are
    busy, the next request goes late and its latency still counts from its scheduled time.
    """
    if max_inflight < 1:
        raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
    offsets = arrival_offsets(rate, config, arrival, rng)
    threads_n = max(1, min(max_inflight, len(offsets)))
    # A short lead so every worker is up before the first arrival is due.
    start = clock() + 0.05
    shared = _Shared.for_step(payloads, config, start, clock)
    threads = [
        threading.Thread(
            target=_open_worker,
            args=(shared, factory, start, offsets, clock),
            name=f"bench-o{i}",
            daemon=True,
        )
        for i in range(threads_n)
    ]
    for th in threads:
        th.start()
    windows, stable = _measure(shared, threads, config, start, clock)
    return open_step_result(windows, stable, config, rate, start, offsets)
