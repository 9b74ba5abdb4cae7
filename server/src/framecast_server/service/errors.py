"""The one mapping from server exceptions to gRPC status codes and messages."""

from __future__ import annotations

import logging

import grpc
from framecast_client.wire import PreprocessingMismatchError, WireFormatError

from ..backends.base import BackendError
from ..batcher import BatcherClosedError, DeadlineExpiredError, QueueFullError

logger = logging.getLogger(__name__)


class ModelNotReadyError(Exception):
    """A call arrived while the model is still loading or warming up."""


class ModelNotFoundError(LookupError):
    """A call names a model or model version this server does not serve; the text says which."""


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and the message a person reads for an exception raised serving a call."""
    if isinstance(exc, WireFormatError):
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
    if isinstance(exc, BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, "the server is shutting down"
    if isinstance(exc, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelNotReadyError):
        return grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly"
    if isinstance(exc, BackendError):
        logger.error("backend failure: %s", exc)
        return grpc.StatusCode.INTERNAL, f"inference failed on the server: {exc}"
    logger.exception("unexpected error serving a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__})"
