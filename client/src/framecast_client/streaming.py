"""Streaming classification: frames in, results out, over one long-lived ClassifyStream call.

``Client.stream`` and ``AsyncClient.stream`` return a session. Each session runs this pipeline,
with a bounded buffer between every two stages:

    source --reader thread--> raw --preprocess thread--> ready --request iterator--> server
    user <-- output <-- response reader (a thread, or a task on the event loop) <-- server

* The **reader thread** only pulls frames from the source, so a camera is read at its own pace
  whatever the server does. The **preprocess thread** decodes, resizes and wraps the next frame
  while the previous ones make their round trip.
* At most ``max_in_flight`` frames are outstanding (sent, no answer yet). The server answers the
  frames of one stream in the order they came, so results come back in source order.

Modes:

* ``"realtime"`` (cameras): every buffer holds one frame and a new frame replaces the oldest
  unsent one, so the latest frame wins and latency cannot grow when the server or the network
  is slower than the camera. Replaced frames, and frames in flight when the connection breaks,
  are counted as dropped and get no result.
* ``"lossless"`` (files): nothing is dropped. The reader waits for room instead (the source is
  read only as fast as the server answers), and frames in flight when the connection breaks are
  sent again on the next connection. Every frame gets exactly one result, in order.

When the server goes away (UNAVAILABLE, connection reset) the session reconnects with an
exponential, capped, jittered :class:`Backoff` and carries on, unless ``reconnect=False``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, TypeVar

import grpc
import numpy as np

from . import wire
from ._proto import classifier_pb2 as pb
from ._proto import classifier_pb2_grpc as pb_grpc
from ._rpc import from_status
from .errors import FramecastError, InvalidImageError, RpcError, UnavailableError
from .histogram import LogHistogram
from .preprocess import ChannelOrder, ImageInput, PreprocessSpec, preprocess
from .types import Classification

__all__ = [
    "AsyncStreamSession",
    "Backoff",
    "FrameError",
    "LatencySummary",
    "StreamMode",
    "StreamResult",
    "StreamSession",
    "StreamStats",
]

logger = logging.getLogger(__name__)

StreamMode: TypeAlias = Literal["realtime", "lossless"]
STREAM_MODES: tuple[StreamMode, ...] = ("realtime", "lossless")

# Frames outstanding by default, per mode. Realtime: three keep the server busy (one
# computing, one queued, one on the way) while latency stays a few frames' worth of server
# time; more only add latency when the server is the bottleneck. Measured against ONNX Runtime
# on 2 cores, synthetic camera at 30 fps: 3 in flight gave 15.5 fps out at p50 186 ms, 8 gave
# the same 15.5 fps at p50 472 ms, 2 gave 13.3 fps at 165 ms. Lossless: more hide the round
# trip for throughput.
DEFAULT_MAX_IN_FLIGHT: dict[StreamMode, int] = {"realtime": 3, "lossless": 8}
# Results the user has not taken yet, beyond the frames in flight: past that, answers are not
# read, so in-flight slots stay taken and a slow consumer slows (realtime: drops) the stream
# instead of queueing results without bound.
_OUTPUT_SLACK = 8
# Latencies kept for StreamStats.recent_latency_ms.
_RECENT_LATENCIES = 256
# The latency histogram of a session: percentiles within 1 %, from 10 µs to 10^4 s.
_LATENCY_RELATIVE_ERROR = 0.01
_LOWEST_MS = 0.01
_HIGHEST_MS = 1e7
# How long close() waits for a source stuck in next() (a stalled camera) before leaving its
# thread behind (it is a daemon thread, and exits as soon as the source returns).
_SOURCE_JOIN_TIMEOUT_S = 2.0
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
# How a reset connection shows when it is not reported as UNAVAILABLE.
_RESET_MARKERS = ("stream removed", "rst_stream", "connection reset", "socket closed")

T = TypeVar("T")


# --- public value types ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """How a stream waits between attempts to reconnect: exponential, capped, jittered.

    Attempt ``n`` (counting from 0 since the connection broke) waits a uniformly random time
    in ``[(1 - jitter) * d, d]`` with ``d = min(max_s, initial_s * multiplier ** n)``: the
    jitter keeps many cameras that lost the same server from reconnecting in lockstep, and
    the cap bounds how long a recovered server goes unnoticed.

    Attributes:
        initial_s: Delay before the first attempt, seconds.
        max_s: Cap of the delay, seconds.
        multiplier: Growth of the delay per failed attempt (>= 1).
        jitter: Fraction of the delay that is randomized, 0 (none) to 1.
        give_up_after_s: Fail the session with UnavailableError once the server has been
            unreachable this long; None (the default) keeps trying until the session closes.
    """

    initial_s: float = 0.1
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    give_up_after_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(
                f"need 0 < initial_s <= max_s, got initial_s={self.initial_s}, max_s={self.max_s}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, got {self.jitter}")
        if self.give_up_after_s is not None and self.give_up_after_s <= 0:
            raise ValueError(
                f"give_up_after_s must be positive or None, got {self.give_up_after_s}"
            )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before attempt ``attempt`` (0-based), in seconds."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        ceiling = self.max_s
        if self.multiplier > 1:
            # Compared in log space: multiplier ** attempt overflows a float for large attempts.
            steps_to_cap = math.log(self.max_s / self.initial_s) / math.log(self.multiplier)
            if attempt < steps_to_cap:
                ceiling = min(self.max_s, self.initial_s * self.multiplier**attempt)
        else:
            ceiling = self.initial_s
        u = (rng or random).random()
        return ceiling * (1.0 - self.jitter * u)


@dataclass(frozen=True, slots=True)
class FrameError:
    """Why one frame has no classification; the stream goes on.

    Attributes:
        code: The gRPC status of the failure, e.g. INVALID_ARGUMENT.
        message: What went wrong, for a person.
        origin: ``"client"`` when the frame could not be read or preprocessed (it was never
            sent), ``"server"`` when the server failed it.
    """

    code: grpc.StatusCode
    message: str
    origin: Literal["client", "server"]

    def exception(self) -> FramecastError:
        """The exception the blocking API would raise for this failure."""
        if self.origin == "client":
            return InvalidImageError(self.message)
        if self.code is grpc.StatusCode.UNAVAILABLE:
            return UnavailableError(self.code, self.message)
        return from_status(self.code, self.message, address="")


@dataclass(frozen=True, slots=True)
class StreamResult:
    """The outcome of one frame of a stream.

    Attributes:
        frame_id: The id the frame carried on the wire (unique within the session).
        index: The frame's position in the source (0 for the first frame read).
        outcome: The classification, or the per-frame error.
        latency_ms: Client-side latency: from the moment the frame was read from the source
            to the moment its result arrived (preprocessing and queueing included).
    """

    frame_id: int
    index: int
    outcome: Classification | FrameError
    latency_ms: float

    @property
    def ok(self) -> bool:
        """True when the frame was classified."""
        return isinstance(self.outcome, Classification)

    @property
    def error(self) -> FrameError | None:
        """The per-frame error, or None when the frame was classified."""
        return self.outcome if isinstance(self.outcome, FrameError) else None

    @property
    def classification(self) -> Classification:
        """The classification; raises the frame's error (InvalidImageError, RpcError) if any."""
        if isinstance(self.outcome, FrameError):
            raise self.outcome.exception()
        return self.outcome


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of client-side latency, in milliseconds (NaN when there is no sample)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True)
class StreamStats:
    """A snapshot of a session's counters.

    Every frame read from the source ends up as exactly one of: a result (``received``),
    ``dropped``, or still in the pipeline. In lossless mode nothing is dropped.

    Attributes:
        mode: ``"realtime"`` or ``"lossless"``.
        elapsed_s: Seconds since the session started.
        read: Frames read from the source.
        sent: Frames sent to the server (a frame sent again after a reconnect counts once).
        resent: Frames sent again after a reconnect (lossless mode).
        received: Results produced: classifications and per-frame errors, including frames
            that failed to preprocess on the client.
        errors: Per-frame errors among ``received``.
        dropped: Frames that will get no result (realtime mode): replaced by a newer frame
            before they could be sent, or in flight when the connection broke.
        disconnects: Times the connection to the server broke.
        reconnects: Times the stream was re-established and answered again.
        in_flight: Frames sent and not answered yet, now.
        max_in_flight: The most frames ever in flight at once.
        latency_ms: Latency of every classified frame of the session.
        recent_latency_ms: Latency of the last classified frames (up to 256).
    """

    mode: StreamMode
    elapsed_s: float
    read: int
    sent: int
    resent: int
    received: int
    errors: int
    dropped: int
    disconnects: int
    reconnects: int
    in_flight: int
    max_in_flight: int
    latency_ms: LatencySummary
    recent_latency_ms: LatencySummary


# --- configuration shared by the clients ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Everything a session needs from its client; built by ``_BaseClient._stream_config``."""

    address: str
    credentials: grpc.ChannelCredentials | None
    channel_options: tuple[tuple[str, Any], ...]
    spec: PreprocessSpec
    channel_order: ChannelOrder
    top_k: int
    max_in_flight: int
    mode: StreamMode
    reconnect: bool
    backoff: Backoff


def make_stream_config(
    *,
    address: str,
    credentials: grpc.ChannelCredentials | None,
    channel_options: Sequence[tuple[str, Any]],
    spec: PreprocessSpec,
    channel_order: ChannelOrder,
    num_classes: int,
    top_k: int,
    max_in_flight: int | None,
    mode: str,
    reconnect: bool,
    backoff: Backoff | None,
) -> StreamConfig:
    """Validate the arguments of ``stream()`` and bundle them; raises ValueError."""
    if mode not in STREAM_MODES:
        raise ValueError(f"mode must be one of {', '.join(STREAM_MODES)}; got {mode!r}")
    checked_mode: StreamMode = "realtime" if mode == "realtime" else "lossless"
    if max_in_flight is None:
        max_in_flight = DEFAULT_MAX_IN_FLIGHT[checked_mode]
    if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1:
        raise ValueError(f"max_in_flight must be a positive integer, got {max_in_flight!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_classes:
        raise ValueError(f"top_k must be between 1 and {num_classes}, got {top_k!r}")
    backoff = backoff or Backoff()
    # The channel reconnects on its own schedule, which by default starts at 1 s and grows to
    # 120 s: a stream retrying faster would only meet a channel still waiting. Align the
    # channel's schedule with the session's so that a restarted server is found promptly.
    options = (
        *channel_options,
        ("grpc.initial_reconnect_backoff_ms", max(1, round(backoff.initial_s * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, round(backoff.max_s * 1000))),
    )
    return StreamConfig(
        address=address,
        credentials=credentials,
        channel_options=options,
        spec=spec,
        channel_order=channel_order,
        top_k=top_k,
        max_in_flight=max_in_flight,
        mode=checked_mode,
        reconnect=reconnect,
        backoff=backoff,
    )


# --- the pipeline, shared by the sync and async sessions ------------------------------------


class _Signal:
    """A sentinel returned by the non-blocking core methods."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


_WAIT = _Signal("WAIT")  # nothing to do yet: wait for the next change
_END = _Signal("END")  # nothing more will come


@dataclass(slots=True)
class _Raw:
    index: int
    frame: Any
    captured: float


@dataclass(slots=True)
class _Ready:
    frame_id: int
    index: int
    captured: float
    request: pb.StreamRequest | None  # None when preprocessing failed
    error: FrameError | None


@dataclass(slots=True)
class _Outstanding:
    item: _Ready
    sent: bool
    result: StreamResult | None = None


class _Latencies:
    """Client-side latencies: a log-bucketed histogram of all, and the most recent ones.

    The histogram answers a percentile within 1 % of the exact value, in constant memory
    however long the session runs.
    """

    def __init__(self) -> None:
        self._all = LogHistogram(
            relative_error=_LATENCY_RELATIVE_ERROR, lowest=_LOWEST_MS, highest=_HIGHEST_MS
        )
        self._recent: collections.deque[float] = collections.deque(maxlen=_RECENT_LATENCIES)

    def record(self, ms: float) -> None:
        ms = max(ms, 0.0)
        self._all.record(ms)
        self._recent.append(ms)

    def summary(self) -> LatencySummary:
        h = self._all
        if h.count == 0:
            return _empty_latency()
        return LatencySummary(
            count=h.count,
            p50=h.percentile(50.0),
            p90=h.percentile(90.0),
            p99=h.percentile(99.0),
            max=h.max,
        )

    def recent_summary(self) -> LatencySummary:
        if not self._recent:
            return _empty_latency()
        values = np.fromiter(self._recent, dtype=np.float64)
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return LatencySummary(
            count=len(values),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            max=float(values.max()),
        )


def _empty_latency() -> LatencySummary:
    nan = float("nan")
    return LatencySummary(count=0, p50=nan, p90=nan, p99=nan, max=nan)


def _retriable(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failed stream means the server or the connection went away."""
    if code is grpc.StatusCode.UNAVAILABLE:
        return True
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        lowered = details.lower()
        return any(marker in lowered for marker in _RESET_MARKERS)
    return False


def _rpc_status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    # Both grpc.Call and grpc.aio.AioRpcError provide code() and details().
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return code, details or ""


class _StreamCore:
    """The state of one session: buffers, in-flight frames, counters, and the two threads.

    Every method whose name ends in ``_locked`` must be called with ``lock`` held; the others
    take it. Every change calls the listeners (so an asyncio session can wake its coroutines)
    and notifies ``cond`` (so threads can wait on it). The non-blocking methods return
    ``_WAIT`` when their caller must wait for a change.
    """

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._realtime = config.mode == "realtime"
        # Realtime: one frame per buffer, the newest. Lossless: a window's worth, so the
        # server never waits on the client's preprocessing.
        self._buffer_capacity = 1 if self._realtime else config.max_in_flight
        self._output_capacity = config.max_in_flight + _OUTPUT_SLACK
        self._listeners: list[Callable[[], None]] = []
        self._raw: collections.deque[_Raw] = collections.deque()
        self._ready: collections.deque[_Ready] = collections.deque()
        self._outstanding: collections.OrderedDict[int, _Outstanding] = collections.OrderedDict()
        self._resend: collections.deque[int] = collections.deque()
        self._output: collections.deque[StreamResult] = collections.deque()
        self.generation = 0
        self._stopping = False
        self._closed = False
        self._source_done = False
        self._preprocess_done = False
        self._finished = False
        self._failure: BaseException | None = None
        self._source_failure: BaseException | None = None
        self._next_frame_id = 0
        self._started = time.monotonic()
        self._latencies = _Latencies()
        self._read = 0
        self._sent = 0
        self._resent = 0
        self._received = 0
        self._errors = 0
        self._dropped = 0
        self._disconnects = 0
        self._reconnects = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._threads: list[threading.Thread] = []

    # -- plumbing

    def is_stopping(self) -> bool:
        """Whether the session is ending: every stage stops taking new work."""
        return self._stopping

    def add_listener(self, listener: Callable[[], None]) -> None:
        with self.lock:
            self._listeners.append(listener)

    def _changed_locked(self) -> None:
        self.cond.notify_all()
        for listener in self._listeners:
            listener()

    def start_threads(self, frames: Iterable[ImageInput]) -> None:
        """Start reading and preprocessing ``frames``."""
        reader = threading.Thread(
            target=self._read_source, args=(frames,), name="framecast-stream-reader", daemon=True
        )
        worker = threading.Thread(
            target=self._preprocess_frames, name="framecast-stream-preprocess", daemon=True
        )
        self._threads = [reader, worker]
        for thread in self._threads:
            thread.start()

    def join_threads(self) -> None:
        """Wait for the reader and preprocess threads (after stop()); blocking."""
        reader, worker = self._threads or (None, None)
        if worker is not None:
            worker.join()
        if reader is not None:
            reader.join(_SOURCE_JOIN_TIMEOUT_S)
            if reader.is_alive():
                logger.warning(
                    "the frame source did not return within %.0f s of closing the stream; "
                    "its reader thread will exit when it does",
                    _SOURCE_JOIN_TIMEOUT_S,
                )

    def stop(self, *, close: bool = False) -> None:
        """Stop every stage; with close=True the user's iteration ends too."""
        with self.lock:
            self._stopping = True
            self._closed = self._closed or close
            self._changed_locked()

    def fail(self, exc: BaseException) -> None:
        """End the session with ``exc``: results already out are delivered first."""
        with self.lock:
            if self._failure is None and not self._finished:
                self._failure = exc
            self._finished = True
            self._stopping = True
            self._changed_locked()

    # -- reader thread

    def _read_source(self, frames: Iterable[ImageInput]) -> None:
        iterator: Iterator[ImageInput] | None = None
        try:
            iterator = iter(frames)
            index = 0
            while not self.is_stopping():
                try:
                    frame = next(iterator)
                except StopIteration:
                    break
                captured = time.monotonic()
                with self.lock:
                    if not self._realtime:
                        while len(self._raw) >= self._buffer_capacity and not self.is_stopping():
                            self.cond.wait()
                    if self.is_stopping():
                        break
                    self._read += 1
                    if len(self._raw) >= self._buffer_capacity:
                        self._raw.popleft()  # realtime: the latest frame wins
                        self._dropped += 1
                    self._raw.append(_Raw(index, frame, captured))
                    self._changed_locked()
                index += 1
        except Exception as exc:
            # Frames already read still get their results; the error ends the iteration.
            logger.error("the frame source failed: %r", exc)
            with self.lock:
                self._source_failure = exc
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:
                    logger.warning("closing the frame source failed: %r", exc)
            with self.lock:
                self._source_done = True
                self._changed_locked()

    # -- preprocess thread

    def _preprocess_frames(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self.is_stopping() and not (
                        (self._raw or self._source_done)
                        and (self._realtime or len(self._ready) < self._buffer_capacity)
                    ):
                        self.cond.wait()
                    if self.is_stopping() or not self._raw:
                        return
                    raw = self._raw.popleft()
                    self._changed_locked()
                request, error = self._prepare(raw)
                with self.lock:
                    if self.is_stopping():
                        return
                    frame_id = self._next_frame_id
                    self._next_frame_id += 1
                    if request is not None:
                        request.frame_id = frame_id
                    if len(self._ready) >= self._buffer_capacity:
                        self._ready.popleft()  # realtime: the latest frame wins
                        self._dropped += 1
                    self._ready.append(_Ready(frame_id, raw.index, raw.captured, request, error))
                    self._changed_locked()
        except Exception as exc:
            logger.exception("preprocessing failed unexpectedly")
            self.fail(exc)
        finally:
            with self.lock:
                self._preprocess_done = True
                self._changed_locked()

    def _prepare(self, raw: _Raw) -> tuple[pb.StreamRequest | None, FrameError | None]:
        config = self.config
        try:
            image = preprocess(raw.frame, config.spec, channel_order=config.channel_order)
        except (InvalidImageError, TypeError) as exc:
            logger.debug("frame %d cannot be preprocessed: %s", raw.index, exc)
            return None, FrameError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "client")
        request = pb.StreamRequest(image=wire.image_to_proto(image), top_k=config.top_k)
        return request, None

    # -- the request iterator of the current call

    def take_locked(self, generation: int) -> pb.StreamRequest | _Signal:
        """The next frame to send on call ``generation``, _WAIT, or _END (half-close)."""
        if self.is_stopping() or generation != self.generation:
            return _END
        if self._resend:
            slot = self._outstanding[self._resend.popleft()]
            slot.sent = True
            self._resent += 1
            self._count_in_flight_locked()
            assert slot.item.request is not None
            return slot.item.request
        while (
            self._ready
            and len(self._outstanding) < self.config.max_in_flight
            and len(self._output) < self._output_capacity
        ):
            item = self._ready.popleft()
            self._changed_locked()
            if item.request is None:
                # Never sent: its result is ready now, delivered once the frames before it are.
                assert item.error is not None
                self._outstanding[item.frame_id] = _Outstanding(item, sent=False)
                self._complete_locked(item.frame_id, item.error)
                continue
            self._outstanding[item.frame_id] = _Outstanding(item, sent=True)
            self._sent += 1
            self._count_in_flight_locked()
            return item.request
        if self._source_done and self._preprocess_done and not self._raw and not self._ready:
            return _END
        return _WAIT

    def _count_in_flight_locked(self) -> None:
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)
        self._changed_locked()

    # -- the response reader of the current call

    def output_room_locked(self) -> bool:
        """Whether the next answer may be read (else results wait for the user)."""
        return self.is_stopping() or len(self._output) < self._output_capacity

    def on_response_locked(self, generation: int, response: pb.StreamResponse) -> None:
        """Record the answer for one frame."""
        if generation != self.generation:
            return  # a late answer on a call already given up; its frames were dealt with
        slot = self._outstanding.get(response.frame_id)
        if slot is None or not slot.sent or slot.result is not None:
            logger.warning(
                "ignoring an answer for frame %d, which is not in flight", response.frame_id
            )
            return
        outcome: Classification | FrameError
        if response.HasField("classification"):
            outcome = wire.classification_from_proto(response.classification)
        else:
            code = _CODE_BY_VALUE.get(response.error.code, grpc.StatusCode.UNKNOWN)
            outcome = FrameError(code, response.error.message, "server")
        self._in_flight -= 1
        self._complete_locked(response.frame_id, outcome)

    def _complete_locked(self, frame_id: int, outcome: Classification | FrameError) -> None:
        slot = self._outstanding[frame_id]
        latency_ms = (time.monotonic() - slot.item.captured) * 1000.0
        slot.result = StreamResult(frame_id, slot.item.index, outcome, latency_ms)
        self._received += 1
        if isinstance(outcome, FrameError):
            self._errors += 1
        else:
            self._latencies.record(latency_ms)
        self._flush_locked()

    def _flush_locked(self) -> None:
        """Move finished frames to the output, in source order."""
        while self._outstanding:
            frame_id, slot = next(iter(self._outstanding.items()))
            if slot.result is None:
                break
            del self._outstanding[frame_id]
            self._output.append(slot.result)
        self._changed_locked()

    def on_break_locked(self) -> int:
        """The current call failed: give up its frames (realtime) or queue them again."""
        self.generation += 1
        self._disconnects += 1
        self._in_flight = 0
        waiting = [fid for fid, slot in self._outstanding.items() if slot.result is None]
        if self._realtime:
            for frame_id in waiting:
                del self._outstanding[frame_id]
            self._dropped += len(waiting)
            self._flush_locked()
        else:
            for frame_id in waiting:
                self._outstanding[frame_id].sent = False
            self._resend = collections.deque(waiting)
        self._changed_locked()
        return len(waiting)

    def on_reconnected_locked(self) -> None:
        self._reconnects += 1
        self._changed_locked()

    def drained_locked(self) -> bool:
        """Whether every frame of the source has its result (or was dropped)."""
        return (
            self._source_done
            and self._preprocess_done
            and not self._raw
            and not self._ready
            and not self._resend
            and not self._outstanding
        )

    def finish(self) -> None:
        """The last call ended with every frame answered."""
        with self.lock:
            if self._failure is None:
                self._failure = self._source_failure
            self._finished = True
            self._stopping = True
            self._changed_locked()

    # -- the user's iteration

    def pop_locked(self) -> StreamResult | BaseException | _Signal:
        """The next result, the failure that ended the stream (once), _WAIT or _END."""
        if self._closed:
            return _END
        if self._output:
            result = self._output.popleft()
            self._changed_locked()
            return result
        if self._finished:
            failure, self._failure = self._failure, None
            return _END if failure is None else failure
        return _WAIT

    def stats(self) -> StreamStats:
        """A snapshot of the counters."""
        with self.lock:
            return StreamStats(
                mode=self.config.mode,
                elapsed_s=time.monotonic() - self._started,
                read=self._read,
                sent=self._sent,
                resent=self._resent,
                received=self._received,
                errors=self._errors,
                dropped=self._dropped,
                disconnects=self._disconnects,
                reconnects=self._reconnects,
                in_flight=self._in_flight,
                max_in_flight=self._max_in_flight,
                latency_ms=self._latencies.summary(),
                recent_latency_ms=self._latencies.recent_summary(),
            )


class _Reconnector:
    """Decides, after a broken call, whether and when to try again."""

    def __init__(self, config: StreamConfig) -> None:
        self._config = config
        self._rng = random.Random()
        self._attempt = 0
        self._outage_since: float | None = None

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    def recovered(self) -> None:
        self._attempt = 0
        self._outage_since = None

    def next_delay(self, code: grpc.StatusCode, details: str) -> float | RpcError:
        """Seconds to wait before the next attempt, or the error that ends the session."""
        config = self._config
        if not config.reconnect or not _retriable(code, details):
            return from_status(code, details, address=config.address)
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        delay = config.backoff.delay(self._attempt, self._rng)
        self._attempt += 1
        give_up = config.backoff.give_up_after_s
        if give_up is not None and now + delay - self._outage_since > give_up:
            return UnavailableError(
                grpc.StatusCode.UNAVAILABLE,
                f"no Framecast server answers at {config.address} after trying for "
                f"{now - self._outage_since:.1f} s ({details})",
            )
        return delay


def _log_break(config: StreamConfig, code: grpc.StatusCode, details: str, lost: int) -> None:
    what = "resent" if config.mode == "lossless" else "dropped"
    logger.warning(
        "the stream to %s broke (%s: %s); %d frame(s) in flight will be %s; reconnecting",
        config.address,
        code.name,
        details,
        lost,
        what,
    )


# --- the blocking session -------------------------------------------------------------------


class StreamSession:
    """A running stream; iterate over it for :class:`StreamResult`, in source order.

    Made by :meth:`Client.stream`; use it as a context manager so that closing it stops the
    source, the threads and the call::

        with client.stream(camera, mode="realtime") as session:
            for result in session:
                print(result.index, result.classification.top.label, session.stats.dropped)

    Iteration ends when the source is exhausted and every frame has its result. It raises
    the error that ended the stream, if any: an RpcError the session does not retry (or
    UnavailableError once ``Backoff.give_up_after_s`` has passed), or the exception of a
    failing source, after the results that were already in.
    """

    def __init__(self, frames: Iterable[ImageInput], config: StreamConfig) -> None:
        """Start streaming ``frames`` (normally called by Client.stream)."""
        self._core = _StreamCore(config)
        self._config = config
        self._call: Any = None
        options = list(config.channel_options)
        if config.credentials is None:
            self._channel = grpc.insecure_channel(config.address, options=options)
        else:
            self._channel = grpc.secure_channel(config.address, config.credentials, options)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._core.start_threads(frames)
        self._driver = threading.Thread(
            target=self._drive, name="framecast-stream-receiver", daemon=True
        )
        self._driver.start()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> StreamSession:
        return self

    def __next__(self) -> StreamResult:
        core = self._core
        with core.lock:
            while (item := core.pop_locked()) is _WAIT:
                core.cond.wait()
        if isinstance(item, StreamResult):
            return item
        if isinstance(item, BaseException):
            raise item
        raise StopIteration

    @property
    def stats(self) -> StreamStats:
        """Live counters and latency percentiles."""
        return self._core.stats()

    def close(self) -> None:
        """Stop the source, the threads and the call; results not yet taken are discarded."""
        core = self._core
        core.stop(close=True)
        with core.lock:
            call = self._call
        if call is not None:
            call.cancel()
        self._driver.join()
        core.join_threads()

    def _requests(self, generation: int) -> Iterator[pb.StreamRequest]:
        core = self._core
        while True:
            with core.lock:
                while (item := core.take_locked(generation)) is _WAIT:
                    core.cond.wait()
            if not isinstance(item, pb.StreamRequest):
                return
            yield item

    def _drive(self) -> None:
        """The receiver thread: one call after another until the stream ends."""
        core, config = self._core, self._config
        reconnector = _Reconnector(config)
        try:
            while True:
                generation = core.generation
                call: Any = self._stub.ClassifyStream(self._requests(generation))
                with core.lock:
                    # close() cancels the call it finds here; a call made after it looked is
                    # cancelled by this check instead.
                    self._call = call
                    if core.is_stopping():
                        call.cancel()
                        return
                try:
                    answered = False
                    for response in call:
                        with core.lock:
                            while not core.output_room_locked():
                                core.cond.wait()
                            if core.is_stopping():
                                return
                            core.on_response_locked(generation, response)
                            if not answered and reconnector.in_outage:
                                core.on_reconnected_locked()
                                logger.info("the stream to %s is back", config.address)
                            answered = True
                        reconnector.recovered()
                    with core.lock:
                        if core.drained_locked():
                            break
                    # The server ended the stream before answering every frame.
                    code, details = grpc.StatusCode.UNAVAILABLE, "the server ended the stream"
                except grpc.RpcError as exc:
                    code, details = _rpc_status(exc)
                if core.is_stopping():
                    return
                delay = reconnector.next_delay(code, details)
                if isinstance(delay, RpcError):
                    core.fail(delay)
                    return
                with core.lock:
                    lost = core.on_break_locked()
                _log_break(config, code, details, lost)
                with core.lock:
                    core.cond.wait_for(core.is_stopping, delay)
            core.finish()
        except Exception as exc:
            logger.exception("the stream's receiver failed unexpectedly")
            core.fail(exc)
        finally:
            core.stop()
            self._channel.close()


# --- the asyncio session --------------------------------------------------------------------


class AsyncStreamSession:
    """The asyncio twin of :class:`StreamSession`; iterate with ``async for``.

    Made by :meth:`AsyncClient.stream`; it starts on ``async with`` (or on the first
    ``async for`` step, or :meth:`start`)::

        async with client.stream(frames, mode="lossless") as session:
            async for result in session:
                ...

    Reading and preprocessing run on two threads of the session, as in the blocking session
    (sources and preprocessing block); the call itself runs on the event loop.
    """

    def __init__(
        self,
        frames: Iterable[ImageInput],
        configure: Callable[[], Awaitable[StreamConfig]],
        *,
        mode: StreamMode,
    ) -> None:
        """``configure`` fetches the server's preprocessing and builds the StreamConfig."""
        self._frames = frames
        self._configure = configure
        self._mode: StreamMode = mode
        self._core: _StreamCore | None = None
        self._config: StreamConfig | None = None
        self._call: Any = None
        self._channel: grpc.aio.Channel | None = None
        self._driver: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._starting: asyncio.Lock | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncStreamSession:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncStreamSession:
        return self

    async def __anext__(self) -> StreamResult:
        core = await self._started_core()
        item = await self._wait(core.pop_locked)
        if isinstance(item, StreamResult):
            return item
        if isinstance(item, BaseException):
            raise item
        raise StopAsyncIteration

    @property
    def stats(self) -> StreamStats:
        """Live counters and latency percentiles (all zero before the session starts)."""
        if self._core is None:
            empty = _empty_latency()
            return StreamStats(self._mode, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, empty, empty)
        return self._core.stats()

    async def start(self) -> None:
        """Fetch the server's preprocessing and start streaming (idempotent)."""
        await self._started_core()

    async def _started_core(self) -> _StreamCore:
        if self._core is not None:
            return self._core
        if self._closed:
            raise RuntimeError("this stream session is closed")
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._core is None:
                config = await self._configure()
                loop = asyncio.get_running_loop()
                wakeup = asyncio.Event()

                def wake() -> None:
                    # RuntimeError: the loop is closed, and nobody is left to wake.
                    with contextlib.suppress(RuntimeError):
                        loop.call_soon_threadsafe(wakeup.set)

                core = _StreamCore(config)
                core.add_listener(wake)
                options = list(config.channel_options)
                if config.credentials is None:
                    channel = grpc.aio.insecure_channel(config.address, options=options)
                else:
                    channel = grpc.aio.secure_channel(config.address, config.credentials, options)
                self._config, self._wakeup, self._channel = config, wakeup, channel
                self._core = core
                core.start_threads(self._frames)
                self._driver = asyncio.ensure_future(self._drive(core, config, channel))
        return self._core

    async def aclose(self) -> None:
        """Stop the source, the threads and the call; results not yet taken are discarded."""
        if self._closed:
            return
        self._closed = True
        core = self._core
        if core is None:
            return
        core.stop(close=True)
        if self._call is not None:
            self._call.cancel()
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
        await asyncio.to_thread(core.join_threads)

    async def _wait(self, attempt: Callable[[], T | _Signal]) -> T | _Signal:
        """Call ``attempt`` under the lock until it returns something other than _WAIT."""
        core, wakeup = self._core, self._wakeup
        assert core is not None
        assert wakeup is not None
        while True:
            # Cleared before the check: a change after the check sets it again, so no wake-up
            # is lost between the check and the wait.
            wakeup.clear()
            with core.lock:
                item = attempt()
            if item is not _WAIT:
                return item
            await wakeup.wait()

    async def _sleep_unless_stopped(self, core: _StreamCore, delay: float) -> None:
        deadline = time.monotonic() + delay
        wakeup = self._wakeup
        assert wakeup is not None
        while not core.is_stopping():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            wakeup.clear()
            try:
                await asyncio.wait_for(wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _requests(
        self, core: _StreamCore, generation: int
    ) -> AsyncIterator[pb.StreamRequest]:
        while True:
            item = await self._wait(lambda: core.take_locked(generation))
            if not isinstance(item, pb.StreamRequest):
                return
            yield item

    async def _drive(
        self, core: _StreamCore, config: StreamConfig, channel: grpc.aio.Channel
    ) -> None:
        """The receiver task: one call after another until the stream ends."""
        stub = pb_grpc.ClassifierStub(channel)
        reconnector = _Reconnector(config)

        def room() -> bool | _Signal:
            return core.output_room_locked() or _WAIT

        try:
            while not core.is_stopping():
                generation = core.generation
                call = stub.ClassifyStream(self._requests(core, generation))
                self._call = call
                try:
                    answered = False
                    async for response in call:
                        await self._wait(room)
                        with core.lock:
                            if core.is_stopping():
                                return
                            core.on_response_locked(generation, response)
                            if not answered and reconnector.in_outage:
                                core.on_reconnected_locked()
                                logger.info("the stream to %s is back", config.address)
                            answered = True
                        reconnector.recovered()
                    with core.lock:
                        drained = core.drained_locked()
                    if drained:
                        core.finish()
                        return
                    code, details = grpc.StatusCode.UNAVAILABLE, "the server ended the stream"
                except grpc.RpcError as exc:
                    code, details = _rpc_status(exc)
                if core.is_stopping():
                    return
                delay = reconnector.next_delay(code, details)
                if isinstance(delay, RpcError):
                    core.fail(delay)
                    return
                with core.lock:
                    lost = core.on_break_locked()
                _log_break(config, code, details, lost)
                await self._sleep_unless_stopped(core, delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("the stream's receiver failed unexpectedly")
            core.fail(exc)
        finally:
            core.stop()
            await channel.close(None)
