"""Shared fixtures: real servers on loopback port 0, real channels, a hermetic model cache."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from framecast_client import Client
from framecast_server.process.background import BackgroundServer

# Fixtures for every test: start_server, and host_kind/start_host (in-process or shared).
from support import host_kind, make_settings, start_host, start_server  # noqa: F401


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache per test session: the random-weights graph is built once."""
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="session")
def onnx_server(cache_dir: Path) -> Iterator[BackgroundServer]:
    """A real server on ONNX Runtime with the default (offline: random) ResNet-50."""
    with BackgroundServer(make_settings(cache_dir)) as server:
        yield server


@pytest.fixture
def client(onnx_server: BackgroundServer) -> Iterator[Client]:
    """A real client on a real channel to the session's server."""
    with Client(onnx_server.address, timeout=60.0) as c:
        yield c


class StreamBroke(logging.Handler):
    """Sets ``event`` when a session logs that its stream broke."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "broke" in record.getMessage():
            self.event.set()


@pytest.fixture
def stream_broke() -> Iterator[threading.Event]:
    handler = StreamBroke()
    logger = logging.getLogger("framecast_client.streaming")
    logger.addHandler(handler)
    try:
        yield handler.event
    finally:
        logger.removeHandler(handler)
