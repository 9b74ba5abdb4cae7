"""Typed client errors, each carrying its gRPC status, made from grpc.RpcError in one place."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
from framecast_client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    FramecastError,
    InvalidArgumentError,
    InvalidImageError,
    RpcError,
    UnavailableError,
)
from framecast_client._rpc import from_status
from framecast_server.process.background import BackgroundServer
from support import random_frames


@pytest.fixture
def dead_address() -> Iterator[str]:
    """An address where nothing listens: a bound, never-listening socket refuses connections."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_no_server_gives_a_clear_unavailable_error(dead_address: str) -> None:
    with Client(dead_address, timeout=5) as client, pytest.raises(UnavailableError) as caught:
        client.classify(random_frames(1)[0])
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE
    assert f"no Framecast server answers at {dead_address}" in str(caught.value)
    assert isinstance(caught.value.__cause__, grpc.RpcError)


@pytest.mark.asyncio
async def test_async_client_maps_errors_the_same_way(dead_address: str) -> None:
    async with AsyncClient(dead_address, timeout=5) as client:
        with pytest.raises(UnavailableError, match="no Framecast server answers"):
            await client.model_info()


def test_invalid_argument_from_the_server_is_typed(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="top_k must be between 1 and 1000") as caught:
        client.classify(random_frames(1)[0], top_k=0)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT


def test_unreadable_image_is_an_invalid_image_error(client: Client) -> None:
    with pytest.raises(InvalidImageError):
        client.classify(b"this is not an image")


def test_status_mapping_covers_the_tree() -> None:
    deadline = from_status(grpc.StatusCode.DEADLINE_EXCEEDED, "late", address="x:1")
    other = from_status(grpc.StatusCode.INTERNAL, "boom", address="x:1")
    assert isinstance(deadline, DeadlineExceededError)
    assert type(other).__name__ == "ServerError"
    assert isinstance(other, RpcError)
    assert isinstance(other, FramecastError)
    assert str(other) == "INTERNAL: boom"


def test_closed_client_refuses_calls(onnx_server: BackgroundServer) -> None:
    client = Client(onnx_server.address)
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.model_info()
