"""The framecast command end to end: demo, classify, info, build-engine, serve --backend auto."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from framecast_client.cli import main
from framecast_server.process.background import BackgroundServer
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
    captured = capsys.readouterr()
    out = captured.out
    # The warning goes to the log (stderr): stdout stays a table a script can parse.
    assert "WARNING" not in out
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
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["image", "label", "probability", "ms/image"]
    assert len(lines) == 3
    assert lines[1].startswith(str(photo))
    assert lines[1].endswith(" ms")
    assert onnx_server.serving is not None
    assert any(f"  {name}  " in lines[1] for name in onnx_server.serving.model.labels)


def test_info_shows_model_backend_preprocessing_and_weights(
    onnx_server: BackgroundServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", "--address", onnx_server.address]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "backend        onnxruntime (fp32), max batch 8" in out
    assert "shorter side to 232, center crop 224x224, bilinear" in out
    assert "NOT pretrained" in out


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


def test_classify_batches_directories_and_reports_each_failure(
    onnx_server: BackgroundServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from framecast_client import Client

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):
        Image.new("RGB", (320, 240), (20 * i, 100, 200 - 15 * i)).save(photos / f"{i:02}.jpg")
    (photos / "broken.jpg").write_text("not a picture")
    (photos / "notes.txt").write_text("skipped: not an image suffix")
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing.png"

    requests: list[int] = []
    original = Client.classify_preprocessed

    def spy(self: Client, batch: Any, **kwargs: Any) -> Any:
        requests.append(len(batch))
        return original(self, batch, **kwargs)

    monkeypatch.setattr(Client, "classify_preprocessed", spy)
    argv = ["classify", str(photos), str(missing), str(empty), "--address", onnx_server.address]
    assert main(argv) == 1
    captured = capsys.readouterr()
    # Every good image is classified, in batches of the server's max batch (8), not one by one.
    assert requests == [8, 2]
    rows = captured.out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == [str(photos / f"{i:02}.jpg") for i in range(10)]
    # Each failure on its own line, then a count.
    failures = captured.err.splitlines()  # the warning is logged, not printed
    assert len(failures) == 4
    # In the order of the inputs.
    assert failures[0].startswith(f"framecast classify: {photos / 'broken.jpg'}: cannot decode")
    assert failures[1].startswith(f"framecast classify: {missing}: image file not found")
    assert failures[2].startswith(f"framecast classify: {empty}: directory holds no images")
    assert failures[3] == "framecast classify: 3 of 13 inputs failed"
    assert "Traceback" not in captured.err


def test_the_sdk_logs_the_random_weights_warning_once_per_client(
    onnx_server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    from framecast_client import Client

    caplog.set_level(logging.WARNING, logger="framecast_client.client")
    for _ in range(2):
        with Client(onnx_server.address) as client:
            client.model_info()
            client.model_info(refresh=True)
    warnings = [r for r in caplog.records if "RANDOM WEIGHTS" in r.getMessage()]
    assert len(warnings) == 2  # one per client, however often it asks
    assert all(r.name == "framecast_client.client" for r in warnings)


def framecast(*argv: str) -> subprocess.CompletedProcess[str]:
    """The ``framecast`` command in its own process, with its real logging on stderr."""
    return subprocess.run(
        [sys.executable, "-m", "framecast_client.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("command", ["classify", "info", "demo", "bench", "bench oip"])
def test_each_command_warns_about_random_weights_once(
    command: str, onnx_server: BackgroundServer, photo: Path, cache_dir: Path
) -> None:
    if command == "demo":
        done = framecast("demo", str(photo), "--offline", "--cache-dir", str(cache_dir))
    elif command == "classify":
        done = framecast("classify", str(photo), "--address", onnx_server.address)
    elif command.startswith("bench"):
        protocol = "oip" if command.endswith("oip") else "framecast"
        short = ["--concurrency", "1", "--warmup", "0", "--window", "0.3", "--max-windows", "1"]
        done = framecast("bench", onnx_server.address, "--protocol", protocol, *short)
    else:
        done = framecast("info", "--address", onnx_server.address)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("RANDOM WEIGHTS") == 1, done.stderr
    assert "RANDOM WEIGHTS" not in done.stdout


def test_classify_shows_each_images_share_of_its_batch(
    onnx_server: BackgroundServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from framecast_client import Client

    photos = [tmp_path / f"{i}.jpg" for i in range(4)]
    for i, path in enumerate(photos):
        Image.new("RGB", (320, 240), (60 * i, 100, 200)).save(path)
    batch_s: list[float] = []
    original = Client.classify_preprocessed

    def slow_batch(self: Client, batch: Any, **kwargs: Any) -> Any:
        # A batch that takes at least 2 s: per-batch figures would then add up to 8 s.
        started = time.perf_counter()
        time.sleep(2.0)
        results = original(self, batch, **kwargs)
        batch_s.append(time.perf_counter() - started)
        return results

    monkeypatch.setattr(Client, "classify_preprocessed", slow_batch)
    started = time.perf_counter()
    assert main(["classify", *map(str, photos), "--address", onnx_server.address]) == 0
    wall_ms = (time.perf_counter() - started) * 1000.0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(batch_s) == 1, "the four images go in one request"
    shown_ms = [float(row.split()[-2]) for row in rows]
    assert len(shown_ms) == 4
    for ms in shown_ms:
        assert ms >= batch_s[0] * 1000.0 / 4 - 0.1, (shown_ms, batch_s)  # its share, at least
    # Each image's time is its own: together they fit in the command's run.
    assert sum(shown_ms) <= wall_ms, (shown_ms, wall_ms)
