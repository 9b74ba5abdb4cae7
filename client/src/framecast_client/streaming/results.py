"""What a session reports: each frame's result, and the counters and latencies of the stream."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Literal

import grpc
import numpy as np

from .. import wire
from .._proto import classifier_pb2 as pb
from .._rpc import from_status
from ..errors import FramecastError, InvalidImageError, UnavailableError
from ..histogram import LogHistogram
from ..types import Classification
from .config import StreamMode

# Latencies kept for StreamStats.recent_latency_ms.
_RECENT_LATENCIES = 256
# The latency histogram of a session: percentiles within 1 %, from 10 µs to 10^4 s.
_LATENCY_RELATIVE_ERROR = 0.01
_LOWEST_MS = 0.01
_HIGHEST_MS = 1e7
_CODE_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_DROP_REASONS: dict[int, str] = {
    pb.DROP_REASON_STALE_AT_ADMISSION: "stale_at_admission",
    pb.DROP_REASON_STALE_AT_COMPUTE: "stale_at_compute",
}


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
    # Set when the server dropped the frame for its age (the stream's max_age):
    # "stale_at_admission" or "stale_at_compute"; empty otherwise.
    drop_reason: str = ""

    def exception(self) -> FramecastError:
        """The exception the blocking API would raise for this failure."""
        if self.origin == "client":
            return InvalidImageError(self.message)
        if self.code is grpc.StatusCode.UNAVAILABLE:
            return UnavailableError(self.code, self.message)
        return from_status(self.code, self.message, address="")


def frame_outcome(response: pb.StreamResponse) -> Classification | FrameError:
    """What the server answered for one frame: its classification, or why it has none."""
    if response.HasField("classification"):
        return wire.classification_from_proto(response.classification)
    code = _CODE_BY_VALUE.get(response.error.code, grpc.StatusCode.UNKNOWN)
    reason = _DROP_REASONS.get(response.error.drop_reason, "")
    return FrameError(code, response.error.message, "server", reason)


@dataclass(frozen=True, slots=True)
class StreamResult:
    """The outcome of one frame of a stream.

    Attributes:
        frame_id: The id the frame carried on the wire (unique within the session).
        index: The frame's position in the source (0 for the first frame read).
        outcome: The classification, or the per-frame error.
        latency_ms: Client-side latency: from the moment the frame was read from the source
            to the moment its result arrived (preprocessing and queueing included).
        age_ms: The frame's age when the server started computing it, as the server states
            it (the client's capture-to-send time plus the server's own time); None when the
            server did not compute it or states no age.
    """

    frame_id: int
    index: int
    outcome: Classification | FrameError
    latency_ms: float
    age_ms: float | None = None

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
        skipped: Frames skipped at capture (realtime, ``follow_hints``): read from the
            source but neither prepared nor sent, since the server's rate hint said they
            would not be served in time. Also counted in ``dropped``.
        bytes_sent: Bytes of the frames sent (their encoded messages).
        rate_hint_fps: The server's last rate hint for this stream; 0 before any.
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
    skipped: int = 0
    bytes_sent: int = 0
    rate_hint_fps: float = 0.0


@dataclass(slots=True)
class Counters:
    """A session's running counts, guarded by its core's lock; ``snapshot`` reports them."""

    mode: StreamMode
    started: float = field(default_factory=time.monotonic)
    latencies: Latencies = field(default_factory=lambda: Latencies())
    read: int = 0
    sent: int = 0
    resent: int = 0
    received: int = 0
    errors: int = 0
    dropped: int = 0
    disconnects: int = 0
    reconnects: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    skipped: int = 0
    bytes_sent: int = 0

    def snapshot(self, rate_hint_fps: float) -> StreamStats:
        return StreamStats(
            mode=self.mode,
            elapsed_s=time.monotonic() - self.started,
            read=self.read,
            sent=self.sent,
            resent=self.resent,
            received=self.received,
            errors=self.errors,
            dropped=self.dropped,
            disconnects=self.disconnects,
            reconnects=self.reconnects,
            in_flight=self.in_flight,
            max_in_flight=self.max_in_flight,
            latency_ms=self.latencies.summary(),
            recent_latency_ms=self.latencies.recent_summary(),
            skipped=self.skipped,
            bytes_sent=self.bytes_sent,
            rate_hint_fps=rate_hint_fps,
        )


class Latencies:
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
            return empty_latency()
        return LatencySummary(
            count=h.count,
            p50=h.percentile(50.0),
            p90=h.percentile(90.0),
            p99=h.percentile(99.0),
            max=h.max,
        )

    def recent_summary(self) -> LatencySummary:
        if not self._recent:
            return empty_latency()
        values = np.fromiter(self._recent, dtype=np.float64)
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return LatencySummary(
            count=len(values),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            max=float(values.max()),
        )


def empty_latency() -> LatencySummary:
    nan = float("nan")
    return LatencySummary(count=0, p50=nan, p90=nan, p99=nan, max=nan)
