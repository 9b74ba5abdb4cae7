"""Fixtures for the model layer: random weights, built graphs, photo-like images and a local
stand-in for the Hugging Face hub."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from framecast_server.model import PRESETS, build_resnet50, random_weights
from numpy.typing import NDArray
from safetensors.numpy import save_file

from .model_helpers import FakeHub, photo_like


@pytest.fixture(scope="session")
def tv_weights() -> dict[str, NDArray[np.float32]]:
    """Random ResNet-50 weights calibrated for the torchvision preset."""
    return random_weights(101, PRESETS["torchvision"])


@pytest.fixture(scope="session")
def caffe_weights() -> dict[str, NDArray[np.float32]]:
    """Random ResNet-50 weights calibrated for the caffe preset (0..255-scale input)."""
    return random_weights(202, PRESETS["caffe"])


@pytest.fixture(scope="session")
def tv_model(tv_weights: dict[str, NDArray[np.float32]]) -> onnx.ModelProto:
    return build_resnet50(tv_weights, PRESETS["torchvision"])


@pytest.fixture(scope="session")
def caffe_model(caffe_weights: dict[str, NDArray[np.float32]]) -> onnx.ModelProto:
    return build_resnet50(caffe_weights, PRESETS["caffe"])


@pytest.fixture(scope="session")
def images() -> NDArray[np.uint8]:
    return photo_like(4, seed=7)


@pytest.fixture(scope="session")
def weights_file(
    tmp_path_factory: pytest.TempPathFactory, tv_weights: dict[str, NDArray[np.float32]]
) -> Path:
    """The torchvision-calibrated random weights as a safetensors file, like the hub's."""
    path = tmp_path_factory.mktemp("hubfiles") / "model.safetensors"
    save_file(tv_weights, str(path))
    return path


@pytest.fixture
def fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub(url="", routes={})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hub.requests.append(self.path)
            route = hub.routes.get(self.path)
            if route is None:
                self.send_error(404, "Entry not found")
                return
            route(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean; requests are recorded above

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def closed_port_url() -> str:
    """An http URL on a loopback port nothing listens on: connections are refused at once."""
    return _closed_port_url()


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach the real hub by accident: the endpoint defaults to a closed
    loopback port and offline mode starts unset; tests override either explicitly."""
    monkeypatch.setenv("HF_ENDPOINT", _closed_port_url())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
