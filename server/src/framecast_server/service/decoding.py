"""Services registered from generated code (health, reflection, the Open Inference Protocol)
get what our own servicer does by hand: malformed requests get INVALID_ARGUMENT, and, for a
protocol servicer, its calls pass the call gate (counted for the drain, refused once draining).

gRPC parses a request before the handler runs; bytes that do not parse make it answer UNKNOWN
and log a traceback, for every such message. Our own servicers take raw bytes and parse them
with ``codecs.requests.decode``. Services from libraries are registered through
:func:`guarded`, which hands them the same treatment: their handlers receive raw bytes, parse
them with the service's own deserializer, and a failure ends the call with INVALID_ARGUMENT
through the one error mapping (a short message, a rate-limited log line, no traceback). Given
a gate, each call enters it first (UNAVAILABLE once draining) and leaves it when it ends;
health stays ungated, so it answers throughout a drain.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from framecast_client.wire_format import WireFormatError

from ..core.admission import Admission
from ..core.drain import CallGate
from .callers import caller_of
from .errors import set_status

_Context = grpc.aio.ServicerContext[Any, Any]
if TYPE_CHECKING:  # generic in grpc-stubs only
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Generic = grpc.GenericRpcHandler[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
    _Generic = grpc.GenericRpcHandler


async def read_request(context: _Context) -> Any:
    """The one request of a unary call registered as request-streaming (to admit it unread)."""
    request = await context.read()
    if request is grpc.aio.EOF:  # type: ignore[attr-defined]  # absent from grpc-stubs
        raise WireFormatError("the call ended without a request")
    return request


def _malformed(method: str, raw: bytes) -> WireFormatError:
    return WireFormatError(f"the bytes received ({len(raw)}) are not a valid {method} request")


def _entered(gate: CallGate | None, context: _Context) -> bool:
    """Enter ``gate`` (if any) for a call; False, with the call's status set, when refused."""
    if gate is None:
        return True
    try:
        gate.enter()
    except Exception as exc:
        set_status(context, exc)
        return False
    return True


def _guard_handler(
    method: str, handler: _Handler, gate: CallGate | None, admission: Admission | None
) -> _Handler:
    deserialize: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)
    serialize = handler.response_serializer
    leave = gate.leave if gate is not None else lambda: None
    if handler.unary_unary is not None and admission is not None:
        admitted_unary: Any = handler.unary_unary

        async def admitted(requests: AsyncIterator[bytes], context: _Context) -> Any:
            # Registered request-streaming: the call waits for admission before its request
            # is read (admission.py).
            if not _entered(gate, context):
                return None
            entered = False
            caller = caller_of(context)
            try:
                await admission.enter(caller)
                entered = True
                try:
                    raw = await read_request(context)
                except WireFormatError as exc:
                    set_status(context, exc)
                    return None
                try:
                    request = deserialize(raw)
                except Exception:
                    set_status(context, _malformed(method, raw))
                    return None
                del raw
                return await admitted_unary(request, context)
            finally:
                if entered:
                    admission.leave(caller)
                leave()

        return grpc.stream_unary_rpc_method_handler(admitted, response_serializer=serialize)
    if handler.unary_unary is not None:
        unary_unary: Any = handler.unary_unary

        async def unary(raw: bytes, context: _Context) -> Any:
            try:
                request = deserialize(raw)
            except Exception:
                set_status(context, _malformed(method, raw))
                return None
            if not _entered(gate, context):
                return None
            try:
                return await unary_unary(request, context)
            finally:
                leave()

        return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)
    if handler.unary_stream is not None:
        unary_stream: Any = handler.unary_stream
        if inspect.isasyncgenfunction(unary_stream):

            async def generated(raw: bytes, context: _Context) -> AsyncIterator[Any]:
                try:
                    request = deserialize(raw)
                except Exception:
                    set_status(context, _malformed(method, raw))
                    return
                if not _entered(gate, context):
                    return
                try:
                    async for response in unary_stream(request, context):
                        yield response
                finally:
                    leave()

            return grpc.unary_stream_rpc_method_handler(generated, response_serializer=serialize)

        async def writing(raw: bytes, context: _Context) -> None:
            try:
                request = deserialize(raw)
            except Exception:
                set_status(context, _malformed(method, raw))
                return
            if not _entered(gate, context):
                return
            try:
                await unary_stream(request, context)
            finally:
                leave()

        return grpc.unary_stream_rpc_method_handler(writing, response_serializer=serialize)
    if handler.stream_stream is not None:
        stream_stream: Any = handler.stream_stream

        async def requests(raw_iterator: AsyncIterator[bytes], context: _Context) -> Any:
            # A malformed message ends the requests: the handler finishes what it has, and
            # the call ends with INVALID_ARGUMENT.
            async for raw in raw_iterator:
                try:
                    request = deserialize(raw)
                except Exception:
                    set_status(context, _malformed(method, raw))
                    return
                yield request

        async def streaming(raw_iterator: AsyncIterator[bytes], context: _Context) -> Any:
            if not _entered(gate, context):
                return
            try:
                async for response in stream_stream(requests(raw_iterator, context), context):
                    yield response
            finally:
                leave()

        return grpc.stream_stream_rpc_method_handler(streaming, response_serializer=serialize)
    return handler  # stream-unary: none among the services registered through here


class _GuardedHandler(_Generic):
    def __init__(self, inner: _Generic, gate: CallGate | None, admission: Admission | None) -> None:
        self._inner = inner
        self._gate = gate
        self._admission = admission
        # Only the methods the inner handler serves are kept: a fixed, small set.
        self._cache: dict[str, _Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> _Handler | None:
        method = handler_call_details.method
        guarded = self._cache.get(method)
        if guarded is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                return None
            guarded = self._cache[method] = _guard_handler(
                method, handler, self._gate, self._admission
            )
        return guarded


class _GuardedServer:
    """What a library's ``add_..._to_server`` sees: registrations pass through, guarded."""

    def __init__(
        self, server: grpc.aio.Server, gate: CallGate | None, admission: Admission | None
    ) -> None:
        self._server = server
        self._gate = gate
        self._admission = admission

    def add_generic_rpc_handlers(self, handlers: Sequence[_Generic]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_GuardedHandler(h, self._gate, self._admission) for h in handlers)
        )

    def add_registered_method_handlers(self, service: str, handlers: dict[str, _Handler]) -> None:
        # Served through the generic path instead, where the guard applies.
        self.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))


def guarded(
    server: grpc.aio.Server, gate: CallGate | None = None, admission: Admission | None = None
) -> Any:
    """A stand-in for ``server`` to pass to a generated ``add_..._to_server`` function.

    With ``gate``, every call of the service passes it (a protocol servicer's calls); without,
    calls only get their malformed requests handled (health, reflection). With ``admission``,
    its unary calls also wait for admission before their request is read.
    """
    return _GuardedServer(server, gate, admission)
