"""Who a call is for, as the core's fairness sees it: one function every servicer uses."""

from __future__ import annotations

from typing import Any

import grpc

from ..batcher import Caller


def caller_of(context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
    """The batcher's caller key for a call (its fair order and reserves): its connection.

    A client's calls and streams share a connection, so a client with many calls in flight is
    one caller, not many. Once authentication exists, the client's identity takes this place.
    """
    return context.peer()
