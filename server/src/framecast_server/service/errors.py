"""The one mapping from server exceptions to gRPC status codes and messages.

Every servicer (ours, and any other protocol over the same core) turns a failure into a status
here, and nowhere else. Two rules hold for every exception that passes through:

* The message a client reads is short: client-supplied text is quoted by
  ``codecs.requests.quote``, and the whole message is cut to :data:`MAX_MESSAGE_CHARS` (gRPC
  carries it in a header with a size limit; an oversized one would turn the status into
  RESOURCE_EXHAUSTED).
* The exception is *released*: its traceback (and those of its causes) is dropped once it is
  mapped. A traceback holds the frames it passed through, and their locals hold the request
  and often the exception itself: a reference cycle that keeps a 150 KB frame alive until a
  full garbage collection. Callers may keep the (code, message) pair, never the exception.

Malformed messages are the client's mistake, not the server's: they are logged at most once
per :data:`MALFORMED_LOG_INTERVAL_S` with a count, never with a traceback.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from framecast_client.wire_format import WireFormatError

from ..backends.base import BackendBrokenError, BackendError
from ..core.batcher import BatcherClosedError, DeadlineExpiredError, QueueFullError
from ..core.drain import ShuttingDownError
from .codecs.requests import PreprocessingMismatchError

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 512
MALFORMED_LOG_INTERVAL_S = 10.0


class ModelNotReadyError(Exception):
    """A call arrived while the model is still loading or warming up."""


class ModelNotFoundError(LookupError):
    """A call names a model or model version this server does not serve; the text says which."""


class _MalformedLog:
    """Logs malformed requests at most once per interval, with how many came meanwhile."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._next = 0.0
        self._suppressed = 0

    def note(self, message: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more since the last report)" if self._suppressed else ""
        logger.info("malformed request refused: %s%s", message, more)
        self._suppressed = 0
        self._next = now + self._interval_s


_malformed = _MalformedLog(MALFORMED_LOG_INTERVAL_S)


def release(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and of every exception chained to it (see the docstring)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the message a person reads for an exception raised serving a call.

    Releases ``exc`` (drops its tracebacks) after logging what needs logging.
    """
    try:
        code, message = _map(exc)
    finally:
        release(exc)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return code, message


def _map(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, WireFormatError):
        _malformed.note(str(exc)[:MAX_MESSAGE_CHARS])
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, PreprocessingMismatchError):
        # The request is well formed; the server's state (its model) does not fit it.
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, QueueFullError):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the server is at capacity ({exc}); retry after a short backoff",
        )
    if isinstance(exc, DeadlineExpiredError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the image was run"
    if isinstance(exc, (BatcherClosedError, ShuttingDownError)):
        return (
            grpc.StatusCode.UNAVAILABLE,
            "the server is shutting down; reconnect (another replica, or this one restarted)",
        )
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelNotReadyError):
        return grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly"
    broken = _broken_cause(exc)
    if broken is not None:
        return (
            grpc.StatusCode.UNAVAILABLE,
            f"the server's backend is broken and must restart: {broken}",
        )
    if isinstance(exc, BackendError):
        logger.error("backend failure: %s", exc)
        return grpc.StatusCode.INTERNAL, f"inference failed on the server: {exc}"
    logger.error("unexpected error serving a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__})"


def set_status(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> grpc.StatusCode:
    """End a call with the status for ``exc``, without raising; returns the code set.

    ``context.abort`` would raise an exception that grpc keeps on the call's state while its
    traceback holds the handler's frame, and so the call's state: a cycle per failed call.
    Setting the code and returning lets the call end by reference counting alone.
    """
    code, message = status_for(exc)
    context.set_code(code)
    context.set_details(message)
    return code


def _broken_cause(exc: BaseException | None) -> BackendBrokenError | None:
    # The batcher wraps a backend's exception in its own BackendError (the cause).
    while exc is not None:
        if isinstance(exc, BackendBrokenError):
            return exc
        exc = exc.__cause__
    return None
