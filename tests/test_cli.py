"""The framecast command end to end: demo, classify, info, build-engine, serve --backend auto."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from framecast_client.cli import main
from framecast_server.background import BackgroundServer
from PIL import Image
from support import make_settings


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (800, 600), (30, 140, 200)).save(path)
    return path


def test_demo_classifies_generated_images_and_warns_about_random_weights(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--offline", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: RANDOM WEIGHTS" in out
    assert "generated:sunset.jpg" in out
    assert "3 requests, latency per request" in out


def test_demo_classifies_the_images_given(
    cache_dir: Path, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", str(photo), "--top-k", "3", "--offline", "--cache-dir", str(cache_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str(photo) in out
    assert "1 requests" in out


def test_classify_prints_a_table_with_latency(
    onnx_server: BackgroundServer, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["classify", str(photo), str(photo), "--address", onnx_server.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("WARNING: RANDOM WEIGHTS")
    assert lines[1].split() == ["image", "label", "probability", "latency"]
    assert len(lines) == 4
    assert lines[2].startswith(str(photo))
    assert lines[2].endswith(" ms")
    assert onnx_server.serving is not None
    assert any(f"  {name}  " in lines[2] for name in onnx_server.serving.model.labels)


def test_info_shows_model_backend_preprocessing_and_weights(
    onnx_server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--address", onnx_server.address]) == 0
    out = capsys.readouterr().out
    assert "backend        onnxruntime (fp32), max batch 8" in out
    assert "shorter side to 232, center crop 224x224, bilinear" in out
    assert "NOT pretrained" in out
    assert "WARNING: RANDOM WEIGHTS" in out


def test_classify_without_a_server_says_so(photo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        assert main(["classify", str(photo), "--address", address, "--timeout", "5"]) == 1
    assert f"no Framecast server answers at {address}" in capsys.readouterr().err


def test_build_engine_without_a_gpu_fails_fast_naming_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["build-engine", "--offline", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT backend unavailable" in err
    assert "no NVIDIA GPU found" in err
    assert not any(tmp_path.iterdir()), "nothing is prepared before failing"


def test_serve_backend_auto_falls_back_to_onnxruntime_and_says_why(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with BackgroundServer(make_settings(cache_dir, backend="auto")) as server:
        assert server.serving is not None
        assert server.serving.backend.info.name == "onnxruntime"
    assert "backend auto: serving with ONNX Runtime on the CPU because TensorRT" in caplog.text
