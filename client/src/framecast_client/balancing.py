"""Where a client connects, and how its calls spread over replicas and survive losing one.

gRPC balances inside the channel, so no proxy is needed: the channel's target names every
replica and the service config asks for ``round_robin``. Unary calls then rotate over the
replicas whose connections are ready, each new stream call is placed on the next one, and a
replica that goes away (its connection breaks, or it says GOAWAY while draining) is left out
until it is back. A target is

- one address, ``"host:port"``: one server. gRPC's default policy (pick_first) keeps one
  connection and, after the server restarts, reconnects when the next call comes, which
  round robin would instead retry on a backoff schedule, failing calls meanwhile;
- a DNS name of many replicas, ``"dns:///framecast.example:50051"`` (a Kubernetes headless
  Service, say): round robin over every address, re-resolved when a connection breaks;
- ``ipv4:`` and ``ipv6:`` lists (``"ipv4:10.0.0.1:50051,10.0.0.2:50051"``): round robin;
  other gRPC target URIs (``unix:``) are passed on as they are;
- a list of addresses, ``["10.0.0.1:50051", "10.0.0.2:50051"]``: round robin over IP
  literals, or names resolved once, here, when the client is made.

Classify and GetModelInfo are retried on UNAVAILABLE (a replica died, is loading, or refused
a new call while draining), a bounded number of times and throttled, so that a fleet in
trouble is not flooded with retries. Classify is safe to repeat: it has no side effects.
Streams are not retried by gRPC: a session reconnects by itself (see ``streaming``) and its
new call goes to a replica that answers.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from typing import Any, TypeAlias

Address: TypeAlias = "str | Sequence[str]"

SERVICE = "framecast.v1.Classifier"
# Attempts per call, the first included (gRPC caps it at 5). Three reach a third replica when
# two in a row are gone, and bound the extra load a failure makes to two calls.
MAX_ATTEMPTS = 3
# Retry throttling (gRFC A6): each failure costs a token, each success gives back 0.1; retries
# stop while fewer than half the tokens are left, so a fleet that mostly fails gets no retries.
_RETRY_TOKENS = 10
_TOKEN_RATIO = 0.1
MAX_RECONNECT_BACKOFF_MS = 5_000


# Targets whose every address is a replica: balanced with round robin.
BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def is_balanced(target: str) -> bool:
    """Whether calls to ``target`` (a gRPC target) spread over its addresses."""
    return target.startswith(BALANCED_SCHEMES)


def service_config(*, balanced: bool = True, max_attempts: int = MAX_ATTEMPTS) -> str:
    """The channel's service config: retries of the idempotent unary calls; round robin."""
    retry = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.05s",
        "maxBackoff": "0.5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    config: dict[str, Any] = {
        "methodConfig": [
            {
                "name": [
                    {"service": SERVICE, "method": "Classify"},
                    {"service": SERVICE, "method": "GetModelInfo"},
                ],
                "retryPolicy": retry,
            }
        ],
        "retryThrottling": {"maxTokens": _RETRY_TOKENS, "tokenRatio": _TOKEN_RATIO},
    }
    if balanced:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        # Client-side health checking: each connection watches grpc.health.v1, and round robin
        # stops picking a replica the moment it says NOT_SERVING (a drain begins), instead of
        # sending it calls it refuses until the retry budget is spent.
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


def balancing_options(target: str, max_message_bytes: int) -> list[tuple[str, Any]]:
    """Channel options for retries, and round robin where ``target`` has many replicas."""
    return [
        ("grpc.service_config", service_config(balanced=is_balanced(target))),
        ("grpc.enable_retries", 1),
        # A call is retried only while its request is still buffered; the default buffer
        # (256 KiB) holds one frame, so a batch would never be retried.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        # A replica that was down (restarted, rescheduled) is tried again at most this long
        # after its last failure; gRPC's default lets the wait grow to two minutes.
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def display_address(address: Address) -> str:
    """The address as people read it, for messages."""
    return address if isinstance(address, str) else ",".join(address)


def channel_target(address: Address) -> str:
    """The gRPC target for ``address`` (one string, or a list of ``host:port``).

    Raises:
        ValueError: The list is empty, an entry is not ``host:port``, a name does not resolve,
            or the addresses are of both IP families with no family common to all.
    """
    if isinstance(address, str):
        if not address:
            raise ValueError("the server address is empty")
        return address
    if not address:
        raise ValueError("the list of server addresses is empty")
    resolved = [_resolve(entry) for entry in address]
    for family, scheme in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        if all(family in entry for entry in resolved):
            return f"{scheme}:" + ",".join(a for entry in resolved for a in entry[family])
    raise ValueError(
        f"the addresses {display_address(address)} are not all reachable over one IP family "
        "(IPv4 or IPv6); list addresses of one family, or use a dns:/// name"
    )


def _resolve(entry: str) -> dict[int, list[str]]:
    """The addresses of one ``host:port`` entry by family, formatted as gRPC targets want."""
    host, port = _split(entry)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve {host!r} in {entry!r}: {exc.strerror}") from exc
        hosts = [(info[0], str(info[4][0])) for info in infos]
    else:
        hosts = [(socket.AF_INET if literal.version == 4 else socket.AF_INET6, host)]
    found: dict[int, list[str]] = {}
    for family, ip in hosts:
        formatted = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        if family in (socket.AF_INET, socket.AF_INET6) and formatted not in found.get(family, []):
            found.setdefault(family, []).append(formatted)
    return found


def _split(entry: str) -> tuple[str, int]:
    host, sep, port = entry.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a server address must be host:port, got {entry!r}")
    return host, int(port)
