"""Who a call is for, as the core's fairness sees it: one function every servicer uses."""

from __future__ import annotations

from typing import Any

import grpc

from ..batcher import Caller
from ..caller import current_caller


def caller_of(context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
    """The batcher's caller key for a call (its fair order and reserves).

    The authenticated identity where there is one (a token's name or a client certificate's
    subject, set by the auth interceptor), so that one client is one caller over all its
    connections; else the connection, since a client's calls and streams share one.
    """
    return current_caller.get() or context.peer()
