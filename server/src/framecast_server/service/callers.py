"""Who a call is for, as fairness and admission see it: one function every servicer uses."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import grpc

from ..core.batcher import Caller
from ..core.caller import current_caller


# Parsed once per peer string, not per call: a connection's calls share its peer string.
@lru_cache(maxsize=4096)
def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: ``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``.

    IPv6 peers look like ``ipv6:[::1]:51234``; a peer without a port (``unix:...``) is kept.
    """
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    host, colon, port = rest.rpartition(":")
    return f"{kind}:{host}" if colon and port.isdigit() else peer


def caller_of(context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
    """The caller a call belongs to: the key of its fair order, admission and reserves.

    The authenticated identity where there is one (a token's name, or a client certificate's
    subject, set by the auth interceptor), so one client is one caller over all its
    connections; else the peer's host address, so that opening more connections does not make
    a client more callers (cameras behind one NAT count as one caller unless they
    authenticate); else, for a peer with no address (a Unix socket), its connection.
    """
    return current_caller.get() or peer_host(context.peer())
