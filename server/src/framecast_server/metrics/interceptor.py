"""Calls counted for any gRPC service on the server: by method and status code, with durations.

Service-agnostic (a protocol added beside ours is counted the same way). The method label is
the registered method's name; a call to a method nobody serves is counted as ``unknown``, so a
client cannot grow the label set.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # generic in grpc-stubs only; not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor

from ..core.caller import ANONYMOUS, current_caller
from ..service.handlers import wrapped
from .exporter import UNKNOWN_METHOD, Metrics


def _code_name(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    code: object = context.code()  # the stubs say StatusCode; grpc.aio may give an int
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return "UNKNOWN"  # an exception gRPC turns into UNKNOWN
    # grpc.aio reports the code as the core's integer (0 when nobody set it).
    for status in grpc.StatusCode:
        if status.value[0] == (code if isinstance(code, int) else 0):
            return status.name
    return "UNKNOWN"


class MetricsInterceptor(_ServerInterceptor):
    """Counts every call into ``metrics``; put it first, so refused calls are counted too."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        # None for a method nobody serves (gRPC then answers UNIMPLEMENTED); the stubs omit it.
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:
            self._metrics.requests.labels(UNKNOWN_METHOD, "UNIMPLEMENTED").inc()
            return handler  # type: ignore[return-value]
        method: str = handler_call_details.method
        metrics = self._metrics
        # Unary calls that wait for admission unread are registered request-streaming
        # (admission.py); to a client, and here, they are unary calls.
        streaming = handler.response_streaming
        started = time.perf_counter()
        active = metrics.active_streams.labels(method) if streaming else None

        peer = ""

        async def began(context: grpc.aio.ServicerContext[Any, Any]) -> None:
            nonlocal peer
            peer = context.peer()
            metrics.call_opened(peer)
            if active is not None:
                active.inc()

        def finished(
            context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
        ) -> None:
            metrics.requests.labels(method, _code_name(context, error)).inc()
            metrics.call_closed(peer)
            if active is not None:
                active.dec()
            else:
                metrics.request_duration.labels(method).observe(time.perf_counter() - started)
            caller = current_caller.get()
            if caller != ANONYMOUS:
                metrics.caller_requests.labels(caller).inc()

        counted: grpc.RpcMethodHandler[Any, Any] = wrapped(handler, before=began, after=finished)
        return counted
