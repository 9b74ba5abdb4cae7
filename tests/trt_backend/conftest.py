"""Fixtures for the device-free TensorRT backend tests: the tiny ONNX model and fake
``tensorrt`` / ``pycuda.driver`` modules installed in sys.modules for one test."""

from __future__ import annotations

import sys
from typing import Any

import onnx
import pytest

from .trt_fakes import FakeDriver, make_fake_trt
from .trt_testing import make_tiny_model


@pytest.fixture
def tiny_model() -> onnx.ModelProto:
    """The tiny fp32 classifier with the served I/O contract."""
    return make_tiny_model()


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fake TensorRT 10.13 installed as ``tensorrt`` in sys.modules for one test."""
    module = make_fake_trt("10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


@pytest.fixture
def fake_driver(monkeypatch: pytest.MonkeyPatch, fake_trt: Any) -> FakeDriver:
    """A fake ``pycuda.driver`` backed by host memory for one test; the fake TensorRT's
    engines queue their work on its streams."""
    import types

    from framecast_server.backends.tensorrt import availability, cuda

    driver = FakeDriver()
    package = types.ModuleType("pycuda")
    package.driver = driver  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    monkeypatch.setattr(cuda, "_initialized", False)
    # libcuda's own entry points (the primary context's flags) go to the fake driver too.
    monkeypatch.setattr(availability, "load_libcuda", lambda: driver.libcuda)
    fake_trt.driver = driver
    return driver
