"""The drive loop of a stream session, written once and without I/O.

:class:`Drive` is a state machine: the session tells it what happened (a call opened, an
answer came, a call ended or failed, GetModelInfo answered or failed, a pause passed) and it
says what to do next as a :data:`Step`: open a call, fetch the model info, pause, or stop.
It records answers, decides whether and when to reconnect after a break, and adopts the
preprocessing of a restarted server. The blocking session carries the steps out on a thread
(``sync_session``), the asyncio session in a task (``async_session``); each keeps only its
I/O. What to send next, and when to drop or skip frames under the rate hint, is the
pipeline's (:class:`StreamCore`).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TypeAlias

import grpc

from .. import wire
from .._proto import classifier_pb2 as pb
from .._rpc import from_status, rpc_status
from ..errors import RpcError, UnavailableError
from ..wire_format import WireFormatError
from .config import StreamConfig
from .pipeline import StreamCore

logger = logging.getLogger(__name__)

# How a reset connection shows when it is not reported as UNAVAILABLE. The last: grpc.aio
# reports a write that failed because the server's end went away (a server shut down
# mid-stream) as INTERNAL "Internal error from Core", in place of the status the connection
# ended with (grpc/grpc#36066, open in grpcio 1.85); seen here when a server was stopped under
# an asyncio session.
_RESET_MARKERS = (
    "stream removed",
    "rst_stream",
    "connection reset",
    "socket closed",
    "internal error from core",
)
# What a call that ended before answering every frame counts as.
_ENDED_EARLY = (grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
# How long GetModelInfo may take before a reconnect attempt counts as failed.
MODEL_INFO_TIMEOUT_S = 5.0


# How gRPC ends a call still open on a connection the server closes at its maximum age (the
# server's --max-connection-age, after its grace): a healthy server rotating connections so
# that clients re-resolve and spread, not an outage.
_MAX_AGE_MARKER = "max connection age"


def _connection_aged(code: grpc.StatusCode, details: str) -> bool:
    return code is grpc.StatusCode.UNAVAILABLE and _MAX_AGE_MARKER in details.lower()


def _retriable(code: grpc.StatusCode, details: str) -> bool:
    """Whether a failed stream means the server or the connection went away."""
    if code is grpc.StatusCode.UNAVAILABLE:
        return True
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        lowered = details.lower()
        return any(marker in lowered for marker in _RESET_MARKERS)
    return False


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

    def connection_aged(self) -> float:
        """The server ended the connection at its maximum age: try again at once (counted as
        a disconnect and, once answered, a reconnect; a failure after it backs off as usual)."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
        return 0.0

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


@dataclass(frozen=True, slots=True)
class OpenCall:
    """Open the next ClassifyStream call; its requests are ``core.take_locked(generation)``.

    Wait for ``core.output_room_locked()`` before reading each answer, hand each answer to
    :meth:`Drive.on_response_locked`, then report the call's end to :meth:`Drive.call_ended`.
    """

    generation: int


@dataclass(frozen=True, slots=True)
class FetchModelInfo:
    """Ask GetModelInfo with these call options; report the answer or error to
    :meth:`Drive.info_answered`."""

    timeout: float
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Pause:
    """Wait ``seconds``, or until the session stops, then report :meth:`Drive.paused`."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Stop:
    """The session ends: stop the pipeline and close the channel."""


Step: TypeAlias = OpenCall | FetchModelInfo | Pause | Stop
_STOP = Stop()


class Drive:
    """The drive loop of a session, from one call to the next until the stream ends.

    Each method takes what just happened and returns the next :data:`Step`; nothing here
    waits, sends or reads. After a break the session pauses, then (a restarted server may
    serve another model) fetches the model info before the next call.
    """

    def __init__(self, core: StreamCore) -> None:
        self._core = core
        self._config = core.config
        self._reconnector = _Reconnector(core.config)
        self._reconnecting = False
        self._fetch = FetchModelInfo(MODEL_INFO_TIMEOUT_S, tuple(core.config.metadata))

    def start(self) -> Step:
        """The first step of the session."""
        return self._next()

    def _next(self) -> Step:
        if self._core.is_stopping():
            return _STOP
        if self._reconnecting:
            return self._fetch
        return OpenCall(self._core.generation)

    def paused(self) -> Step:
        """A :class:`Pause` passed (or the session stopped meanwhile)."""
        return self._next()

    def info_answered(self, outcome: pb.ModelInfo | grpc.RpcError) -> Step:
        """GetModelInfo answered (prepare frames as it says, then call again) or failed (try
        again after a pause, or end the session)."""
        if isinstance(outcome, grpc.RpcError):
            return self._broken(outcome)
        if not self._adopt(outcome):
            return _STOP
        self._reconnecting = False
        return self._next()

    def call_ended(self, error: grpc.RpcError | None) -> Step:
        """The call failed with ``error``, or (None) its answers ended."""
        if error is None and self._call_complete():
            return _STOP
        return self._broken(error)

    def _broken(self, error: grpc.RpcError | None) -> Step:
        delay = self._after_break(error)
        if delay is None:
            return _STOP
        self._reconnecting = True
        return Pause(delay)

    def on_response_locked(self, generation: int, response: pb.StreamResponse) -> bool:
        """Record an answer of call ``generation``; False when the session is stopping."""
        core = self._core
        if core.is_stopping():
            return False
        core.on_response_locked(generation, response)
        if self._reconnector.in_outage:
            # The first answer since the connection broke.
            core.on_reconnected_locked()
            logger.info("the stream to %s is back", self._config.address)
        self._reconnector.recovered()
        return True

    def _call_complete(self) -> bool:
        """The call's answers ended: whether that was every frame's (the session finishes)."""
        core = self._core
        with core.lock:
            drained = core.drained_locked()
        if drained:
            core.finish()
        return drained

    def _after_break(self, error: grpc.RpcError | None) -> float | None:
        """The call failed with ``error``, or (None) ended before every frame was answered.

        Returns the seconds to wait before the next call, or None when the session ends: it
        is stopping, or fails with the error (not retried, or the backoff gave up).
        """
        core = self._core
        code, details = _ENDED_EARLY if error is None else rpc_status(error)
        if core.is_stopping():
            return None
        if self._config.reconnect and _connection_aged(code, details):
            # Reconnect at once (the new connection may reach another replica), quietly.
            with core.lock:
                lost = core.on_break_locked()
            logger.info(
                "the stream to %s reached the server's maximum connection age; reconnecting "
                "(%d frame(s) in flight %s)",
                self._config.address,
                lost,
                "resent" if self._config.mode == "lossless" else "dropped",
            )
            return self._reconnector.connection_aged()
        delay = self._reconnector.next_delay(code, details)
        if isinstance(delay, RpcError):
            core.fail(delay)
            return None
        with core.lock:
            lost = core.on_break_locked()
        _log_break(self._config, code, details, lost)
        return delay

    def _adopt(self, info: pb.ModelInfo) -> bool:
        """Before a call after a break: prepare frames as the (maybe restarted) server says.

        A server restarted with another model may want other preprocessing; frames prepared
        for the old one would be refused (FAILED_PRECONDITION) or, by a server that does not
        check, classified wrongly. False when the session ends instead: the server asks for a
        preprocessing this client does not know.
        """
        try:
            spec = wire.preprocessing_from_proto(info.preprocessing)
        except WireFormatError as exc:
            logger.error("the stream to %s cannot go on: %s", self._config.address, exc)
            self._core.fail(exc)
            return False
        if self._core.adopt_preprocessing(spec, info.preprocessing_id):
            logger.warning(
                "the server at %s now serves %s %s, which wants other preprocessing (%s); "
                "frames are prepared for it from now on",
                self._config.address,
                info.name,
                info.version,
                info.preprocessing_id,
            )
        return True

    def crashed(self, exc: Exception) -> None:
        """The session's own code failed: log it with its traceback and end the session."""
        logger.exception("the stream's receiver failed unexpectedly")
        self._core.fail(exc)
