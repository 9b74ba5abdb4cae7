"""A client's connections: more than one only where the caller asks for them.

A server runs at most ``max_calls_per_connection`` calls at once on one connection (HTTP/2's
SETTINGS_MAX_CONCURRENT_STREAMS; ModelInfo states it) and gRPC queues further calls on the
client. The limit is how the server shares itself fairly between callers: a client flooding one
connection cannot crowd the calls of others out of the server's event loop, and the server's
fair queue counts a connection as one caller. So a client keeps one connection by default; a
program that wants more calls in flight than the limit (a load generator, a gateway calling
for many cameras) gives the client more (``connections=N``), and the client opens another
only when every open one is at the limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import grpc

# Each connection is its own (gRPC otherwise shares one connection between channels of equal
# settings, and the pool would gain nothing).
OWN_CONNECTION_OPTION = ("grpc.use_local_subchannel_pool", 1)

T = TypeVar("T")


class ConnectionPool(Generic[T]):
    """Up to ``most`` connections opened by ``open_connection`` on demand.

    ``lease`` picks the least busy. Safe to use from many threads. ``limit`` (0: none known) is
    the server's calls per connection; until it is known, every call uses the first connection.
    """

    def __init__(self, open_connection: Callable[[], T], *, most: int = 1) -> None:
        if most < 1:
            raise ValueError(f"connections must be at least 1, got {most}")
        self._open = open_connection
        self._most = most
        self._lock = threading.Lock()
        self._connections: list[T] = [open_connection()]
        self._in_flight: list[int] = [0]
        self.limit = 0

    @property
    def opened(self) -> tuple[T, ...]:
        """Every connection opened so far (to close them)."""
        with self._lock:
            return tuple(self._connections)

    @contextmanager
    def lease(self) -> Iterator[T]:
        """A connection for one call, counted as busy until the block ends."""
        index = self._acquire()
        try:
            yield self._connections[index]
        finally:
            with self._lock:
                self._in_flight[index] -= 1

    def _acquire(self) -> int:
        with self._lock:
            in_flight = self._in_flight
            index = min(range(len(in_flight)), key=in_flight.__getitem__)
            if 0 < self.limit <= in_flight[index] and len(in_flight) < self._most:
                # Channels connect lazily: opening one here costs no round trip under the lock.
                self._connections.append(self._open())
                in_flight.append(0)
                index = len(in_flight) - 1
            in_flight[index] += 1
            return index


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    """A blocking channel: TLS where there are credentials, else plaintext."""
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def open_aio_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.aio.Channel:
    """An asyncio channel: TLS where there are credentials, else plaintext."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)
