"""Exceptions raised by the Framecast client.

    FramecastError                  everything the SDK raises
    ├── InvalidImageError           an input could not be decoded or preprocessed (ValueError too)
    └── RpcError                    the server answered with a non-OK status (carries .code)
        ├── InvalidArgumentError    INVALID_ARGUMENT: the request was malformed
        ├── ResourceExhaustedError  RESOURCE_EXHAUSTED: too large, or the server's queue is full
        ├── DeadlineExceededError   DEADLINE_EXCEEDED: no answer within the deadline
        ├── UnavailableError        UNAVAILABLE: no server answers at the address
        ├── UnauthenticatedError    UNAUTHENTICATED: no token, or one the server does not know
        ├── PermissionDeniedError   PERMISSION_DENIED: the caller is known but not allowed
        ├── PreprocessingChangedError  FAILED_PRECONDITION: the server's model now wants other
        │                           preprocessing (it was restarted with another model)
        └── ServerError             any other status

``RpcError`` subclasses are made from ``grpc.RpcError`` in one place, ``framecast_client._rpc``.
"""

from __future__ import annotations

import grpc


class FramecastError(Exception):
    """Base of every exception the Framecast client raises."""


class InvalidImageError(FramecastError, ValueError):
    """An input image could not be read, decoded or preprocessed."""


class RpcError(FramecastError):
    """The server (or the channel) ended a call with a non-OK status."""

    code: grpc.StatusCode

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgumentError(RpcError):
    """The server rejected the request as malformed."""


class ResourceExhaustedError(RpcError):
    """The request was too large, or the server is at capacity; retry later."""


class DeadlineExceededError(RpcError):
    """No answer arrived within the deadline."""


class UnavailableError(RpcError):
    """No server answered at the address (not running, wrong address, or shutting down)."""


class UnauthenticatedError(RpcError):
    """The server does not know the caller: its token is missing or wrong (``token=``)."""


class PermissionDeniedError(RpcError):
    """The server knows the caller but does not allow it this call."""


class PreprocessingChangedError(RpcError):
    """The images were prepared for a model the server no longer serves.

    The server was restarted with a model that wants other preprocessing. ``classify``
    handles it itself (it reads the model info again and retries once); a caller of
    ``classify_preprocessed`` with images from ``preprocess`` re-reads
    ``model_info(refresh=True)`` and preprocesses again.
    """


class ServerError(RpcError):
    """Any other non-OK status."""
