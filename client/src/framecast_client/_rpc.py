"""The one place where grpc.RpcError becomes a typed Framecast exception."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from .errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    PermissionDeniedError,
    PreprocessingChangedError,
    ResourceExhaustedError,
    RpcError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)

_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.FAILED_PRECONDITION: PreprocessingChangedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def rpc_status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a failed call."""
    # Both grpc.Call and grpc.aio.AioRpcError provide code() and details().
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return code, details or ""


def from_status(code: grpc.StatusCode, details: str, *, address: str) -> RpcError:
    """The most specific exception for a status; UNAVAILABLE names the address."""
    if code is grpc.StatusCode.UNAVAILABLE:
        details = f"no Framecast server answers at {address} ({details})"
        if "Socket closed" in details or "handshake" in details.lower():
            # What a TLS server does to a plaintext client, and a mutual-TLS server to a client
            # without a certificate it trusts: say what to try, not only what happened.
            details += (
                "; a server that closes the connection while it is set up may require TLS "
                "(--tls-ca, tls=TLS(ca=...)) or a client certificate (--tls-cert, --tls-key)"
            )
    return _BY_CODE.get(code, ServerError)(code, details)


@contextmanager
def mapped_rpc_errors(address: str) -> Iterator[None]:
    """Re-raise grpc.RpcError (sync and aio) as the matching RpcError subclass."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_status(*rpc_status(exc), address=address) from exc
