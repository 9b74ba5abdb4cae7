"""What a session is told by its client: the mode, the window, the reconnect policy."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import grpc

from ..preprocess import ChannelOrder, PreprocessSpec
from ..wire import RAW, Encoding

StreamMode: TypeAlias = Literal["realtime", "lossless"]
STREAM_MODES: tuple[StreamMode, ...] = ("realtime", "lossless")

# Frames outstanding by default, per mode. Realtime: three keep the server busy (one
# computing, one queued, one on the way) while latency stays a few frames' worth of server
# time; more only add latency when the server is the bottleneck. Measured against ONNX Runtime
# on 2 cores, synthetic camera at 30 fps: 3 in flight gave 15.5 fps out at p50 186 ms, 8 gave
# the same 15.5 fps at p50 472 ms, 2 gave 13.3 fps at 165 ms. Lossless: more hide the round
# trip for throughput.
DEFAULT_MAX_IN_FLIGHT: dict[StreamMode, int] = {"realtime": 3, "lossless": 8}

# Stream options, sent as the call's metadata (see ClassifyStream in classifier.proto).
STREAM_NAME_KEY = "framecast-stream-name"
STREAM_NAME_LIMIT = 64
MAX_AGE_KEY = "framecast-max-age-ms"
MAX_AGE_LIMIT_S = 3600.0

# Keepalive pings of a stream's channel, seconds. gRPC's guidance is not below 10 s; the server
# accepts pings that often (it allows one per 5 s without data, see framecast_server.process.app).
DEFAULT_KEEPALIVE_S = 10.0
# The channel's reconnection schedule, which a session sets from its Backoff (replacing the
# client's, see framecast_client.balancing).
_BACKOFF_OPTIONS = frozenset({"grpc.initial_reconnect_backoff_ms", "grpc.max_reconnect_backoff_ms"})


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
class StreamConfig:
    """Everything a session needs from its client; built by ``_BaseClient._stream_config``."""

    address: str  # as people read it, for messages
    target: str  # what the channel connects to (see framecast_client.balancing)
    credentials: grpc.ChannelCredentials | None
    metadata: tuple[tuple[str, str], ...]  # sent with every call (the bearer token)
    channel_options: tuple[tuple[str, Any], ...]
    spec: PreprocessSpec  # as the server said when the session started; it may change
    preprocessing_id: str
    channel_order: ChannelOrder
    top_k: int
    max_in_flight: int
    mode: StreamMode
    reconnect: bool
    backoff: Backoff
    encoding: Encoding = RAW  # how frames travel (Client(wire=..., quality=...))
    follow_hints: bool = True  # realtime: skip frames at capture as the server's hint says


def stream_name(name: object) -> str:
    """A stream's name as it travels: cut to 64 characters; raises ValueError.

    Cut here as the server would (a long name costs bytes on every call for nothing). It
    travels as gRPC metadata, which carries printable ASCII only: gRPC would fail the call
    with INTERNAL "Invalid metadata" instead.
    """
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {name!r}")
    if not all(" " <= c <= "~" for c in name):
        raise ValueError(
            f"name must be printable ASCII (it travels as gRPC metadata), got {name!r}"
        )
    return name[:STREAM_NAME_LIMIT]


def make_stream_config(
    *,
    address: str,
    credentials: grpc.ChannelCredentials | None,
    channel_options: Sequence[tuple[str, Any]],
    metadata: Sequence[tuple[str, str]] = (),
    spec: PreprocessSpec,
    preprocessing_id: str,
    channel_order: ChannelOrder,
    num_classes: int,
    top_k: int,
    max_in_flight: int | None,
    mode: str,
    reconnect: bool,
    backoff: Backoff | None,
    keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
    encoding: Encoding = RAW,
    target: str | None = None,
    name: str | None = None,
    max_age: float | None = None,
    follow_hints: bool = True,
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
    if keepalive_s is not None and not keepalive_s > 0:
        raise ValueError(f"keepalive_s must be positive or None, got {keepalive_s!r}")
    if max_age is not None and not 0.001 <= max_age <= MAX_AGE_LIMIT_S:
        raise ValueError(
            f"max_age must be from 0.001 to {MAX_AGE_LIMIT_S:.0f} seconds or None, got {max_age!r}"
        )
    metadata = tuple(metadata)
    if name is not None and (name := stream_name(name)):
        metadata += ((STREAM_NAME_KEY, name),)
    if max_age is not None:
        metadata += ((MAX_AGE_KEY, str(round(max_age * 1000))),)
    backoff = backoff or Backoff()
    # The channel reconnects on its own schedule, which by default starts at 1 s and grows to
    # 120 s: a stream retrying faster would only meet a channel still waiting. Align the
    # channel's schedule with the session's so that a restarted server is found promptly.
    options = (
        *(option for option in channel_options if option[0] not in _BACKOFF_OPTIONS),
        ("grpc.initial_reconnect_backoff_ms", max(1, round(backoff.initial_s * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1, round(backoff.max_s * 1000))),
        # Its own connection, not one shared with the client's other channels (gRPC shares
        # connections between channels of equal settings): servers that spread connections
        # (`framecast serve --workers`, an L4 load balancer) then spread streams too.
        ("grpc.use_local_subchannel_pool", 1),
    )
    if keepalive_s is not None:
        # Without pings a connection whose network silently stopped delivering (a pulled cable,
        # a NAT that forgot the flow) looks open until TCP gives up, minutes later, and the
        # camera's frames are all dropped meanwhile. A failed ping fails the call UNAVAILABLE,
        # which the session handles like any lost server: reconnect with backoff.
        interval_ms = max(1, round(keepalive_s * 1000))
        options = (
            *options,
            ("grpc.keepalive_time_ms", interval_ms),
            ("grpc.keepalive_timeout_ms", interval_ms),
            # grpcio 1.85 waits for a ping's ack this long (default 60 s) whatever the
            # keepalive timeout says: measured, a frozen connection took 60 s, not 2 s.
            ("grpc.http2.ping_timeout_ms", interval_ms),
            ("grpc.http2.max_pings_without_data", 0),  # also while no frames flow
        )
    return StreamConfig(
        address=address,
        target=address if target is None else target,
        credentials=credentials,
        metadata=metadata,
        channel_options=options,
        spec=spec,
        preprocessing_id=preprocessing_id,
        channel_order=channel_order,
        top_k=top_k,
        max_in_flight=max_in_flight,
        mode=checked_mode,
        reconnect=reconnect,
        backoff=backoff,
        encoding=encoding,
        follow_hints=follow_hints,
    )
