"""Wrapping a gRPC method handler while keeping its shape: the tool of our interceptors.

An aio server interceptor returns the handler the call will use. One that wraps or replaces it
must return a handler of the RPC's own shape (unary or streaming on each side, with the same
(de)serializers), or gRPC would read and write the call wrongly. Everything here is
service-agnostic: it works for any servicer on the server.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

# Runs when the call starts, with its context, before the servicer; may abort the call.
Before = Callable[[grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]
# Runs when the call ends (with the exception that ended it, if any), after the servicer.
After = Callable[[grpc.aio.ServicerContext[Any, Any], BaseException | None], None]


def _make(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    streaming = (handler.request_streaming, handler.response_streaming)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[streaming]
    made: grpc.RpcMethodHandler[Any, Any] = factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return made


def _behavior(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[..., Any]:
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None
    return behavior


def rejecting(handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str) -> Any:
    """A handler of ``handler``'s shape that ends every call with ``code`` and ``message``."""

    async def reject(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(code, message)

    return _make(handler, reject)


def wrapped(
    handler: grpc.RpcMethodHandler[Any, Any],
    *,
    before: Before | None = None,
    after: After | None = None,
) -> Any:
    """``handler`` with ``before`` run at the start of each call and ``after`` at its end.

    Response streams are written by the wrapper itself (gRPC's reader/writer form), which is
    what gRPC does for an async generator anyway: no extra cost per message.
    """
    behavior = _behavior(handler)

    if handler.response_streaming:
        # A coroutine handler writes its responses itself (context.write); a generator yields.
        writes_itself = inspect.iscoroutinefunction(behavior)

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            error: BaseException | None = None
            try:
                if before is not None:
                    await before(context)
                if writes_itself:
                    await behavior(request, context)
                else:
                    responses: AsyncIterator[Any] = behavior(request, context)
                    async for response in responses:
                        await context.write(response)
            except BaseException as exc:
                error = exc
                raise
            finally:
                if after is not None:
                    after(context, error)

        return _make(handler, stream)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        error: BaseException | None = None
        try:
            if before is not None:
                await before(context)
            return await behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if after is not None:
                after(context, error)

    return _make(handler, unary)
