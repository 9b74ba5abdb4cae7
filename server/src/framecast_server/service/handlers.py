"""gRPC method handlers wrapped by call shape: the one place a handler is wrapped.

A wrapped handler must keep its RPC's shape (unary or streaming on each side, the same
(de)serializers), or gRPC would read and write the call wrongly. Each wrapper here is written
once over every shape; response streams are written by the wrapper itself (gRPC's
reader/writer form), which is what gRPC does for an async generator anyway.

* :func:`guard`: the one gate and the one error mapping of every call of a protocol servicer.
  The call passes the call gate (counted for the drain; UNAVAILABLE once draining), and an
  exception it raises ends it with the status :mod:`.errors` maps it to: set, not raised, so a
  failed call leaves no reference cycle behind.
* :func:`guarded`: what services registered from generated code (the Open Inference Protocol,
  health, reflection) get on top: their handlers receive raw bytes and parse them with the
  service's own deserializer, so bytes that are not a message get INVALID_ARGUMENT through the
  one mapping (a short message, a rate-limited log line) rather than gRPC's UNKNOWN and a
  logged traceback for every such message. Health stays ungated: it answers throughout a drain.
* :func:`wrapped`, :func:`rejecting`: the interceptors' tools (auth, metrics).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from ..core.drain import CallGate
from .codecs.requests import malformed
from .errors import set_status

_Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # generic in grpc-stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]
    _Generic = grpc.GenericRpcHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    _Generic = grpc.GenericRpcHandler

# Runs when the call starts, with its context, before the servicer; may abort the call.
Before = Callable[[_Context], Awaitable[None]]
# Runs when the call ends (with the exception that ended it, if any), after the servicer.
After = Callable[[_Context, BaseException | None], None]
_Call = Callable[[Any, _Context], Awaitable[Any]]


def _make(handler: Handler, behavior: _Call, *, raw_requests: bool = False) -> Handler:
    """A handler of ``handler``'s shape and serializers running ``behavior``.

    ``raw_requests``: the behaviour takes the request bytes (no deserializer).
    """
    streaming = (handler.request_streaming, handler.response_streaming)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[streaming]
    made: Handler = factory(
        behavior,
        request_deserializer=None if raw_requests else handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return made


def _call(handler: Handler) -> _Call:
    """The handler's behaviour as one coroutine; a response stream is written as it comes."""
    behavior: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behavior is not None
    # A coroutine writes its responses itself (context.write); a generator yields them.
    if not handler.response_streaming or inspect.iscoroutinefunction(behavior):
        call: _Call = behavior
        return call
    generate: Callable[[Any, _Context], AsyncIterator[Any]] = behavior

    async def write(request: Any, context: _Context) -> None:
        async for response in generate(request, context):
            await context.write(response)

    return write


def guard(handler: Handler, gate: CallGate | None) -> Handler:
    """``handler`` with each call passing ``gate`` (if any) and its errors mapped to a status."""
    call = _call(handler)

    async def guarded_call(request: Any, context: _Context) -> Any:
        if gate is not None:
            try:
                gate.enter()
            except Exception as exc:
                set_status(context, exc)
                return None
        try:
            return await call(request, context)
        except grpc.aio.AbortError:
            raise  # the call already has its status: context.abort said so
        except Exception as exc:
            set_status(context, exc)
            return None
        finally:
            if gate is not None:
                gate.leave()

    return _make(handler, guarded_call)


def _parsing(method: str, handler: Handler) -> Handler:
    """``handler`` taking raw bytes, parsed by its deserializer; malformed: INVALID_ARGUMENT."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    call = _call(handler)
    behavior: _Call
    if handler.request_streaming:

        async def requests(raw_iterator: AsyncIterator[bytes], context: _Context) -> Any:
            # A malformed message ends the requests: the handler finishes what it has, and
            # the call ends with INVALID_ARGUMENT.
            async for raw in raw_iterator:
                try:
                    request = deserialize(raw)
                except Exception:
                    set_status(context, malformed(method, len(raw)))
                    return
                yield request

        async def parsed_stream(raw_iterator: AsyncIterator[bytes], context: _Context) -> Any:
            return await call(requests(raw_iterator, context), context)

        behavior = parsed_stream
    else:

        async def parsed(raw: bytes, context: _Context) -> Any:
            try:
                request = deserialize(raw)
            except Exception:
                set_status(context, malformed(method, len(raw)))
                return None
            return await call(request, context)

        behavior = parsed
    return _make(handler, behavior, raw_requests=True)


class _GuardedHandler(_Generic):
    def __init__(
        self, inner: _Generic, gate: CallGate | None, replacing: Mapping[str, Handler]
    ) -> None:
        self._inner = inner
        self._gate = gate
        self._replacing = replacing
        # Only the methods the inner handler serves are kept: a fixed, small set.
        self._cache: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        guarded = self._cache.get(method)
        if guarded is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            replacement = self._replacing.get(method)
            inner = replacement if replacement is not None else _parsing(method, handler)
            guarded = self._cache[method] = guard(inner, self._gate)
        return guarded


class _GuardedServer:
    """What a library's ``add_..._to_server`` sees: registrations pass through, guarded."""

    def __init__(
        self, server: grpc.aio.Server, gate: CallGate | None, replacing: Mapping[str, Handler]
    ) -> None:
        self._server = server
        self._gate = gate
        self._replacing = replacing

    def add_generic_rpc_handlers(self, handlers: Sequence[_Generic]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedHandler(h, self._gate, self._replacing) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        # Served through the generic path instead, where the guard applies.
        self.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def guarded(
    server: grpc.aio.Server,
    gate: CallGate | None = None,
    replacing: Mapping[str, Handler] | None = None,
) -> Any:
    """A stand-in for ``server`` to pass to a generated ``add_..._to_server`` function.

    Every call of the service gets :func:`guard` with ``gate`` (none: health, reflection) and
    its requests parsed from raw bytes, but the methods in ``replacing`` (full method name ->
    handler taking raw bytes), which are served by their own handler (ModelInfer: the unary
    driver, see unary.py).
    """
    return _GuardedServer(server, gate, replacing or {})


# ---------------------------------------------------------------- the interceptors' tools
def rejecting(handler: Handler, code: grpc.StatusCode, message: str) -> Any:
    """A handler of ``handler``'s shape that ends every call with ``code`` and ``message``."""

    async def reject(request: Any, context: _Context) -> None:
        await context.abort(code, message)

    return _make(handler, reject)


def wrapped(handler: Handler, *, before: Before | None = None, after: After | None = None) -> Any:
    """``handler`` with ``before`` run at the start of each call and ``after`` at its end."""
    call = _call(handler)

    async def around(request: Any, context: _Context) -> Any:
        error: BaseException | None = None
        try:
            if before is not None:
                await before(context)
            return await call(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if after is not None:
                after(context, error)

    return _make(handler, around)
