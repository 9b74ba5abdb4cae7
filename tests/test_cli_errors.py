"""A user's mistake on the command line: one line on stderr, exit 2 (usage) or 1 (runtime).

Every case runs the real ``framecast`` entry point in-process and asserts the status, that
stderr is exactly one line naming the problem, and that no traceback is shown.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from framecast_client.cli import main
from support import fails_its_test_run, not_a_classifier

USAGE, RUNTIME = 2, 1


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``framecast ARGV``; return the exit status and stderr."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    return status, capsys.readouterr().err


def assert_one_line(err: str, *fragments: str) -> None:
    """The whole of stderr is one line naming the problem: no progress or log line around it."""
    assert "Traceback" not in err
    assert err.strip(), "nothing on stderr"
    assert err.endswith("\n"), err
    assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture
def not_a_model(tmp_path: Path) -> Path:
    path = tmp_path / "notes.onnx"
    path.write_text("these are notes, not a model\n")
    return path


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port this test process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


USAGE_CASES = [
    (["serve", "--port", "70000"], "--port", "0 to 65535"),
    (["serve", "--port", "-1"], "--port", "0 to 65535"),
    (["serve", "--port", "http"], "--port", "expected an integer"),
    (["serve", "--max-batch", "0"], "--max-batch", "at least 1"),
    (["serve", "--max-batch", "-4"], "--max-batch", "at least 1"),
    (["serve", "--max-queue", "0"], "--max-queue", "at least 1"),
    (["serve", "--threads", "0"], "--threads", "at least 1"),
    (["serve", "--max-delay-us", "-1"], "--max-delay-us", "negative"),
    (["serve", "--max-queue", "4"], "--max-queue (4) must hold", "--max-batch (32)"),
    (["serve", "--max-connections", "0"], "--max-connections", "at least 1"),
    (["serve", "--memory-budget-mb", "0"], "--memory-budget-mb", "more than 0"),
    (["serve", "--grace-s", "-1"], "--grace-s", "negative"),
    (["serve", "--idle-timeout-s", "nan"], "--idle-timeout-s", "finite"),
    (["demo", "--max-batch", "0"], "--max-batch", "at least 1"),
    (["demo", "--port", "65536"], "--port", "0 to 65535"),
    (["demo", "--top-k", "0"], "--top-k", "at least 1"),
    (["demo", "--onnx", "/no/such/model.onnx"], "--onnx", "no such file"),
    (["serve", "--weights", "/no/such/weights.safetensors"], "--weights", "no such file"),
    (["build-engine", "--max-batch", "0"], "--max-batch", "at least 1"),
    # The engine flags serve and build-engine share: the same checks for both.
    (["build-engine", "--opt-batch", "64"], "--opt-batch (64) must be at most --max-batch (32)"),
    (["serve", "--opt-batch", "9", "--max-batch", "8"], "--opt-batch (9)", "--max-batch (8)"),
    (["serve", "--workspace-mib", "0"], "--workspace-mib", "at least 1"),
    (["build-engine", "--optimization-level", "7"], "--optimization-level", "invalid choice"),
    (["classify", "x.jpg", "--top-k", "0"], "--top-k", "at least 1"),
    (["classify", "x.jpg", "--timeout", "0"], "--timeout", "more than 0"),
    (["classify", "x.jpg", "--timeout", "-3"], "--timeout", "more than 0"),
    (["info", "--timeout", "soon"], "--timeout", "expected a number"),
    (["stream", "synthetic", "--max-in-flight", "0"], "--max-in-flight", "at least 1"),
    (["stream", "synthetic", "--top-k", "0"], "--top-k", "at least 1"),
    (["stream", "synthetic", "--duration", "-1"], "--duration", "more than 0"),
    (["bench", "--max-in-flight", "0"], "--max-in-flight", "at least 1"),
    (["bench", "--top-k", "0"], "--top-k", "at least 1"),
    (["bench", "--timeout", "0"], "--timeout", "more than 0"),
    (["serve", "--preset", "caffe"], "--preset applies to --onnx", "default model"),
    (["demo", "--resize", "232"], "--resize applies to --weights and --onnx"),
]


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [(case[0], case[1:]) for case in USAGE_CASES],
    ids=[" ".join(case[0]) for case in USAGE_CASES],
)
def test_bad_flag_values_are_one_usage_line(
    argv: list[str], fragments: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run(argv, capsys)
    assert status == USAGE
    assert_one_line(err, f"framecast {argv[0]}", *fragments)


def test_unknown_flag_is_one_usage_line(capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run(["serve", "--no-such-flag"], capsys)
    assert status == USAGE
    assert_one_line(err, "framecast", "unrecognized arguments: --no-such-flag")


def test_preset_with_weights_is_refused(
    not_a_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = run(["serve", "--weights", str(not_a_model), "--preset", "caffe"], capsys)
    assert status == USAGE
    assert_one_line(err, "--preset applies to --onnx models only", "--weights")


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_port_in_use_names_the_process(
    command: str, taken_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [command, "--port", str(taken_port), "--offline", "--cache-dir", str(tmp_path)]
    status, err = run(argv, capsys)
    assert status == RUNTIME
    assert_one_line(err, f"port {taken_port}", "already in use", f"pid {os.getpid()}")
    assert not any(tmp_path.iterdir()), "nothing is prepared before the bind check"


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_address_not_of_this_host_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 192.0.2.0/24 is TEST-NET-1: documentation only, never a local address.
    argv = [command, "--host", "192.0.2.7", "--port", "0", "--offline"]
    status, err = run([*argv, "--cache-dir", str(tmp_path)], capsys)
    assert status == RUNTIME
    assert_one_line(err, "192.0.2.7 is not an address of this host")


def test_file_that_is_not_weights_under_demo(
    not_a_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--weights", str(not_a_model), "--offline", "--cache-dir", str(tmp_path)]
    status, err = run(argv, capsys)
    assert status == RUNTIME
    assert_one_line(err, "framecast demo:", f"cannot read {not_a_model} as safetensors")


def test_file_that_is_not_a_model_under_demo(
    not_a_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--onnx", str(not_a_model), "--offline", "--cache-dir", str(tmp_path)]
    status, err = run(argv, capsys)
    assert status == RUNTIME
    assert_one_line(err, "framecast demo:", f"cannot read {not_a_model} as an ONNX model")


def serve_in_a_process(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``framecast serve`` as a user runs it: its own process, its real logging on stderr."""
    command = [sys.executable, "-m", "framecast_client.cli", "serve", "--port", "0"]
    return subprocess.run(
        [*command, "--offline", "--cache-dir", str(tmp_path / "cache"), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def a_photo(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 120, 40)).save(path)
    return path


def test_serve_refuses_a_photo_given_as_the_model_in_one_line(tmp_path: Path) -> None:
    cat = a_photo(tmp_path / "cat.jpg")
    done = serve_in_a_process(tmp_path, "--onnx", str(cat))
    assert done.returncode == RUNTIME
    assert_one_line(done.stderr, "framecast serve:", f"cannot read {cat} as an ONNX model")


@pytest.mark.parametrize("content", ["text", "photo"])
def test_serve_refuses_a_file_that_is_not_weights_in_one_line(content: str, tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    if content == "text":
        path.write_text("these are notes, not weights\n")
    else:
        a_photo(tmp_path / "photo.png").rename(path)
    done = serve_in_a_process(tmp_path, "--weights", str(path))
    assert done.returncode == RUNTIME
    assert_one_line(
        done.stderr, "framecast serve:", f"{path} as safetensors", "not a .safetensors weights"
    )


def test_serve_refuses_weights_of_another_network_in_one_line(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"conv1.weight": np.zeros((8, 3, 3, 3), dtype=np.float32)}, str(path))
    done = serve_in_a_process(tmp_path, "--weights", str(path))
    assert done.returncode == RUNTIME
    assert_one_line(
        done.stderr, "framecast serve:", "does not hold torchvision-layout ResNet-50 weights"
    )


def test_serve_refuses_tensorrt_without_a_gpu_in_one_line(tmp_path: Path) -> None:
    from framecast_server.backends.tensorrt.availability import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT can run here")
    done = serve_in_a_process(tmp_path, "--backend", "tensorrt")
    assert done.returncode == RUNTIME
    assert_one_line(done.stderr, "framecast serve:", "TensorRT backend unavailable")
    assert not (tmp_path / "cache").exists(), "nothing is prepared for a backend that cannot run"


def test_serve_refuses_a_graph_that_is_not_a_classifier_in_one_line(tmp_path: Path) -> None:
    # A real ONNX graph whose input is not an image batch: refused before the server listens.
    path = not_a_classifier(tmp_path / "relu.onnx")
    done = serve_in_a_process(tmp_path, "--onnx", str(path))
    assert done.returncode == RUNTIME
    assert_one_line(done.stderr, "framecast serve:", f"cannot serve {path}", "4-D image batch")
    assert not (tmp_path / "cache").exists(), "nothing is built for a graph refused up front"


def test_serve_reports_a_model_failing_while_loading_last_without_shutdown_lines(
    tmp_path: Path,
) -> None:
    # Only a test run finds this one, after the server listens: its progress lines come
    # first, then the reason as the last line; no "closing"/"stopped"/"cancelled" noise of a
    # server that never served.
    path = fails_its_test_run(tmp_path / "one.onnx")
    done = serve_in_a_process(tmp_path, "--onnx", str(path))
    assert done.returncode == RUNTIME
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("framecast serve: could not load the model:"), done.stderr
    assert "fails a test run" in lines[-1], done.stderr
    for noise in ("still running", "closing the port", "stopped", "cancelled"):
        assert noise not in done.stderr, done.stderr


def test_require_pretrained_refuses_random_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["demo", "--require-pretrained", "--offline", "--cache-dir", str(tmp_path)]
    status, err = run(argv, capsys)
    assert status == RUNTIME
    assert_one_line(err, "pretrained weights are required", "downloads are disabled")


def test_version_and_verbose_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run(["--version"], capsys)
    assert status == 0
    # -v after the subcommand is accepted (the runtime error shows it parsed).
    status, err = run(["info", "-v", "--address", "127.0.0.1:1", "--timeout", "2"], capsys)
    assert status == RUNTIME
    assert "no Framecast server answers at 127.0.0.1:1" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("serve", ["Serve ResNet-50", "largest batch (default 32)", "port (0: any free one)"]),
        ("demo", ["classes per image (default 1)", "(default 512)"]),
        ("classify", ["classes per image (default 1)", "(default 10)", "own line"]),
        ("info", ["deadline per call, seconds (default 10)"]),
        ("stream", ["classes per frame (default 1)", "(default localhost:50051)"]),
        ("bench", ["(worker threads; default 64)", "warm-up per step, s (default 2)"]),
        ("build-engine", ["profile max batch (default 32)", "workspace limit, MiB (default 1024)"]),
    ],
)
def test_help_describes_the_command_and_shows_defaults(
    command: str, shown: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for text in shown:
        assert text in out
