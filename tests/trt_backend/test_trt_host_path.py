"""The GPU host path end to end on fake tensorrt/pycuda: `framecast build-engine` then a real
server from `framecast serve`'s flags reuse one engine on one CUDA context, and `--backend
auto` falls back to ONNX Runtime, saying why, when TensorRT cannot parse or build the model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from framecast_client import Client
from framecast_client.cli import build_parser, main
from framecast_server import cli_settings
from framecast_server.backends import factory
from framecast_server.backends.onnxruntime import OnnxRuntimeBackend
from framecast_server.backends.tensorrt import EngineSettings, availability
from framecast_server.backends.tensorrt.errors import EngineBuildError, OnnxParseError
from framecast_server.process.background import BackgroundServer
from model.model_helpers import tiny_classifier
from support import random_frames

from .trt_fakes import FakeDriver


@pytest.fixture
def tensorrt_here(monkeypatch: pytest.MonkeyPatch, fake_driver: FakeDriver) -> None:
    """The availability check passes: the fakes stand for a GPU with TensorRT and pycuda."""
    import framecast_server.backends.tensorrt as trt_package

    monkeypatch.setattr(availability, "tensorrt_unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_package, "tensorrt_unavailable_reason", lambda: None)


@pytest.fixture
def onnx_path(tmp_path: Path) -> Path:
    """A small user ONNX classifier, as `--onnx` takes (prepared into the served graph)."""
    path = tmp_path / "user.onnx"
    onnx.save(tiny_classifier().model, path)
    return path


@pytest.fixture
def served_path(tmp_path: Path, tiny_model: onnx.ModelProto) -> Path:
    """A prepared (served-contract) graph, as the backends are given."""
    path = tmp_path / "served.onnx"
    onnx.save(tiny_model, path)
    return path


def _builds(fake_trt: Any) -> int:
    return sum(1 for event in fake_trt.events if event[0] == "build")


@pytest.mark.parametrize(
    "engine_flags",
    [
        [],  # the defaults: build-engine's were 4 GiB of workspace, serve's 1 GiB
        ["--opt-batch", "4", "--workspace-mib", "512", "--optimization-level", "2"],
    ],
    ids=["defaults", "flags"],
)
def test_build_engine_then_serve_use_one_engine_and_one_cuda_context(
    tmp_path: Path,
    onnx_path: Path,
    fake_trt: Any,
    fake_driver: FakeDriver,
    tensorrt_here: None,
    engine_flags: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ["--onnx", str(onnx_path), "--cache-dir", str(tmp_path / "cache"), "--offline"]
    common += ["--max-batch", "8", *engine_flags]
    assert main(["build-engine", *common]) == 0
    assert "engine: " in capsys.readouterr().out
    assert _builds(fake_trt) == 1

    args = build_parser().parse_args(["serve", "--port", "0", "--backend", "tensorrt", *common])
    settings = cli_settings.settings_from_flags(args)
    assert settings.engine_settings() == cli_settings.engine_settings(
        build_parser().parse_args(["build-engine", *common])
    )
    frames = random_frames(3, seed=5)
    with BackgroundServer(settings) as server, Client(server.address, timeout=30) as client:
        assert server.serving is not None
        assert server.serving.backend.info.name == "tensorrt"
        results = [client.classify(frame) for frame in frames]
    assert len(results) == 3
    assert _builds(fake_trt) == 1, "serve built the engine again"
    # Builder (build-engine and the check at start-up) and the serving worker share the
    # device's primary context: one CUDA context in the process.
    assert fake_driver.contexts == [fake_driver.primary]
    assert fake_driver.primary_refs == 0  # the worker released its hold on close


def test_serve_and_build_engine_default_to_the_same_engine_settings() -> None:
    parser = build_parser()
    serve = cli_settings.settings_from_flags(parser.parse_args(["serve"]))
    build = cli_settings.engine_settings(parser.parse_args(["build-engine"]))
    assert serve.engine_settings() == build == EngineSettings()
    assert build.workspace_bytes == 1 << 30


@pytest.mark.parametrize(
    ("break_it", "error"),
    [
        (lambda trt: setattr(trt, "fail_build", True), EngineBuildError),
        (lambda trt: trt.parser_errors.append(("conv", "Conv", "unsupported")), OnnxParseError),
    ],
    ids=["build fails", "parse fails"],
)
def test_auto_falls_back_to_onnxruntime_loudly_when_tensorrt_fails(
    tmp_path: Path,
    served_path: Path,
    fake_trt: Any,
    tensorrt_here: None,
    caplog: pytest.LogCaptureFixture,
    break_it: Any,
    error: type[Exception],
) -> None:
    break_it(fake_trt)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO)
    backend = factory.create_backend("auto", served_path, max_batch=4, threads=1, cache_dir=cache)
    try:
        assert isinstance(backend, OnnxRuntimeBackend)
        assert backend.infer(np.zeros((2, 224, 224, 3), np.uint8)).shape == (2, 1000)
    finally:
        backend.close()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.name == factory.logger.name
    message = warning.getMessage()
    assert error.__name__ in message
    assert "serving with ONNX Runtime on the CPU instead" in message
    # --backend tensorrt asks for TensorRT or nothing: the same failure stops it.
    with pytest.raises(error):
        factory.create_backend("tensorrt", served_path, max_batch=4, threads=1, cache_dir=cache)
