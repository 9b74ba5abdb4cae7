"""What a front end of ``--inference shared`` answers unary inference calls while the inference
process is away: UNAVAILABLE at once, an interceptor installed on front ends only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from ..service.handlers import rejecting

# What a front end of --inference shared answers a unary call while the inference process is
# away (health says NOT_SERVING until the supervisor has restarted it).
INFERENCE_AWAY = "the inference process is restarting; retry shortly (or another replica)"

if TYPE_CHECKING:  # generic in grpc-stubs only; not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class InferenceAway(_ServerInterceptor):
    """A front end refuses unary inference calls at once (UNAVAILABLE) while the inference
    process is away, rather than hold them until it is back: the client retries elsewhere or
    shortly. Streams are not refused: what they send waits in the front end's region and goes
    to the restarted process, so a lossless stream loses nothing."""

    def __init__(self, away: Callable[[], bool], methods: frozenset[str]) -> None:
        """``away``: whether the inference process is away now; ``methods``: the unary
        inference methods' full names (``/package.Service/Method``)."""
        self._away = away
        self._methods = methods

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is not None and self._away() and handler_call_details.method in self._methods:
            return rejecting(handler, grpc.StatusCode.UNAVAILABLE, INFERENCE_AWAY)  # type: ignore[no-any-return]
        return handler  # type: ignore[return-value]
