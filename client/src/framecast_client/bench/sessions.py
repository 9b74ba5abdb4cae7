"""Sessions: how one benchmark worker talks to the server in each mode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from framecast_client.bench.inputs import Payload
from framecast_client.bench.runner import BenchUnavailableError, Mode, SessionFactory
from framecast_client.client import Client
from framecast_client.types import Classification


class ClassifySession:
    """Unary and batch modes: one Classify call per payload on a shared client.

    Workers share one client (one channel, HTTP/2 multiplexed), as an application with
    several threads would.
    """

    def __init__(self, client: Client, *, top_k: int, timeout: float | None) -> None:
        self._client = client
        self._top_k = top_k
        self._timeout = timeout

    def send(self, payload: Payload) -> Sequence[Classification]:
        """Classify the payload's images in one request."""
        return self._client.classify_preprocessed(
            payload.batch, top_k=self._top_k, timeout=self._timeout
        )

    def close(self) -> None:
        """Nothing to release: the client belongs to the caller."""


def stream_supported(client: Client) -> bool:
    """Whether this client version has the streaming API the stream mode needs."""
    return callable(getattr(client, "stream", None))


def session_factory(
    client: Client, mode: Mode, *, top_k: int, timeout: float | None
) -> SessionFactory:
    """The session factory for ``mode``; raises BenchUnavailableError when it cannot run."""
    if mode in ("unary", "batch"):
        return lambda: ClassifySession(client, top_k=top_k, timeout=timeout)
    if not stream_supported(client):
        raise BenchUnavailableError(
            "stream mode needs Client.stream (the ClassifyStream API), which this "
            "framecast-client does not have yet; use --mode unary or --mode batch"
        )
    return _stream_factory(client, top_k=top_k, timeout=timeout)


def _stream_factory(client: Any, *, top_k: int, timeout: float | None) -> SessionFactory:
    raise BenchUnavailableError(
        "stream mode is not wired to Client.stream yet; use --mode unary or --mode batch"
    )
