"""A network that silently stops delivering: keepalive notices, the stream reconnects.

Between client and server sits a TCP proxy on loopback that can *freeze* its connections: it
keeps them open but forwards nothing more, as a pulled cable or a NAT that forgot the flow
does. Without keepalive nothing fails for TCP's minutes; with it the stream carries on within
a few seconds over a new connection.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from framecast_client import Backoff, Client, StreamResult
from framecast_server.process.background import BackgroundServer
from numpy.typing import NDArray
from support import make_settings

KEEPALIVE_S = 1.0


class FreezingProxy:
    """Forwards 127.0.0.1:port to a target; ``freeze()`` silences every connection open now."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._frozen: set[socket.socket] = set()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self._target_port))
            with self._lock:
                self.connections += 1
                self._open.update((downstream, upstream))
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if source in self._frozen:
                        continue  # swallowed: the network stopped delivering
                sink.sendall(data)
        except OSError:
            pass

    def freeze(self) -> None:
        with self._lock:
            self._frozen.update(self._open)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                sock.close()


class CountingSource:
    """Keyed frames at about 100 fps until stopped; counts what it produced."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.produced = 0

    def __iter__(self) -> Iterator[NDArray[np.uint8]]:
        while not self.stop.wait(0.01):
            yield np.full((32, 32, 3), self.produced % 256, dtype=np.uint8)
            self.produced += 1


@pytest.fixture
def server(cache_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(make_settings(cache_dir, backend="null", max_batch=32)) as server:
        yield server


def test_a_silently_dead_connection_is_noticed_and_the_stream_reconnects(
    server: BackgroundServer,
) -> None:
    proxy = FreezingProxy(server.port)
    source = CountingSource()
    results: list[StreamResult] = []
    frozen_at: int | None = None
    frozen_time = 0.0
    try:
        with (
            Client(f"127.0.0.1:{proxy.port}") as client,
            client.stream(
                source,
                mode="realtime",
                keepalive_s=KEEPALIVE_S,
                backoff=Backoff(initial_s=0.05, max_s=0.5),
            ) as session,
        ):
            for result in session:
                results.append(result)
                if frozen_at is None and len(results) == 20:
                    proxy.freeze()
                    frozen_at, frozen_time = source.produced, time.monotonic()
                if frozen_at is not None and result.index > frozen_at + 5:
                    break  # a frame captured after the freeze came back
            recovered_after = time.monotonic() - frozen_time
            stats = session.stats
    finally:
        source.stop.set()
        proxy.close()
    assert frozen_at is not None
    # Noticed by a ping unanswered for keepalive_s after keepalive_s without traffic, plus
    # the reconnect; far below TCP's minutes. Generous bound for a loaded CI machine.
    assert recovered_after < 10 * KEEPALIVE_S + 5
    assert stats.disconnects >= 1
    assert stats.reconnects >= 1
    assert proxy.connections >= 2  # the stream went on over a new connection
    for result in results:
        predictions = result.classification.predictions
        assert predictions[0].index == result.index % 256


def test_keepalive_must_be_positive_or_none(server: BackgroundServer) -> None:
    with Client(server.address) as client:
        for bad in (0.0, -1.0):
            with pytest.raises(ValueError, match="keepalive_s"):
                client.stream(iter(()), keepalive_s=bad)
