"""A client's connections: as many as its concurrent calls need under the server's limit.

A server runs at most ``max_calls_per_connection`` calls at once on one connection (HTTP/2's
SETTINGS_MAX_CONCURRENT_STREAMS; ModelInfo states it) and gRPC queues further calls on the
client. The limit is how the server shares itself fairly between callers: a client flooding one
connection cannot crowd the calls of others out of the server's event loop. A program that
calls one Client from many threads would then see its calls wait on its own side, and batches
it could fill stay small; so the client opens another connection whenever every open one is
at the limit, up to MAX_CONNECTIONS.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

# Connections one client opens at most: 16 at the default limit of 8 calls each are 128 calls
# in flight, four batches of 32. A client with more threads queues the rest on its side.
MAX_CONNECTIONS = 16

# Each connection is its own (gRPC otherwise shares one connection between channels of equal
# settings, and the pool would gain nothing).
OWN_CONNECTION_OPTION = ("grpc.use_local_subchannel_pool", 1)

T = TypeVar("T")


class ConnectionPool(Generic[T]):
    """Connections opened by ``open_connection`` on demand; ``lease`` picks the least busy.

    Safe to use from many threads. ``limit`` (0: none known) is the server's calls per
    connection; until it is known, every call uses the first connection.
    """

    def __init__(self, open_connection: Callable[[], T]) -> None:
        self._open = open_connection
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
            if 0 < self.limit <= in_flight[index] and len(in_flight) < MAX_CONNECTIONS:
                # Channels connect lazily: opening one here costs no round trip under the lock.
                self._connections.append(self._open())
                in_flight.append(0)
                index = len(in_flight) - 1
            in_flight[index] += 1
            return index
