"""Every example the README shows runs: here, or in the test this file names for it.

Each ```python, ```sh and ```console block is matched, by a line of it, either to a test of
this file, which runs it as written (a test server's address in place of localhost:50051,
images made here), or to the test elsewhere that runs it (TLS, metrics, deployment, GPU hosts).
A block that is neither fails ``test_every_example_is_run_by_a_test``.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from framecast_client.cli import main
from framecast_client.preprocess import _DRAFT_HEADROOM, PreprocessSpec, _draft
from framecast_server.process.background import BackgroundServer
from PIL import Image
from support import wait_until

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLES = [
    (language, text)
    for language, text in re.findall(r"^```(python|sh|console)\n(.*?)^```", README, re.M | re.S)
]
# Examples that need a TLS server run in tests/security/test_readme_security.py.
BLOCKS = [text for language, text in EXAMPLES if language == "python" and "TLS(" not in text]

# A line of a block -> the test that runs the block ("path::test", or a CI script).
SECURITY_TESTS = "tests/security/test_readme_security.py"
DEPLOY_TEST = (
    "tests/deploy/test_readme_deploying.py::test_the_command_runs_or_names_what_the_tests_check"
)
GPU_HOST = "scripts/gpu_check.sh"  # runs these on a GPU host; CI runs it up to the GPU
RUN_ELSEWHERE = {
    "openssl req -x509": f"{SECURITY_TESTS}::readme_certificates",
    "--tls-cert server.pem --tls-key server.key": f"{SECURITY_TESTS}::test_the_tls_commands_run",
    'tls = TLS(ca=Path("ca.pem")': (
        f"{SECURITY_TESTS}::test_the_tls_example_runs_with_mutual_tls_and_a_token"
    ),
    "framecast serve --metrics-port 8002": (
        f"{SECURITY_TESTS}::test_the_metrics_scrape_and_every_documented_metric_exists"
    ),
    "docker build -f deploy/gpu.Dockerfile": GPU_HOST,
    'pip install --extra-index-url https://pypi.nvidia.com "./client"': GPU_HOST,
    "framecast build-engine --max-batch 32": GPU_HOST,
    "framecast serve --host 0.0.0.0 --insecure --workers auto": DEPLOY_TEST,
    "docker build -f deploy/cpu.Dockerfile": DEPLOY_TEST,
    "kubectl kustomize deploy/kubernetes/overlays/cpu": DEPLOY_TEST,
    "kubectl apply -f deploy/kserve/inferenceservice.yaml": DEPLOY_TEST,
    "python3 -m pip install uv && python3 -m uv run pytest": ".ci/run",
    'uv run pytest -m "not slow"': (
        "tests/test_slow_marker.py::test_not_slow_leaves_out_the_slow_tests_and_keeps_the_others"
    ),
    "framecast top localhost:50051 --json --once": (
        "tests/client/test_top.py::test_top_json_lists_the_running_streams_with_their_names"
    ),  # Development: .ci/run runs these tools
}
RUN_HERE = {
    "python3 -m uv run framecast demo": "test_quick_start_demo_runs",
    "# shell 1: listens on": "test_command_line_example_runs",
    "framecast stream synthetic:640x480@30": "test_stream_example_runs",
    "framecast bench localhost:50051 --concurrency": "test_bench_examples_run",
    "framecast bench localhost:50051 --protocol oip": "test_bench_examples_run",
    "framecast bench localhost:50051 --cameras": "test_bench_camera_examples_run",
    **{text.splitlines()[0]: "test_readme_example_runs" for text in BLOCKS},
}


def runs(block: str) -> list[str]:
    """Where ``block`` is run: every entry of the two tables that one of its lines holds."""
    return sorted(
        {
            target
            for table in (RUN_HERE, RUN_ELSEWHERE)
            for key, target in table.items()
            if any(key in line for line in block.splitlines())
        }
    )


def test_every_example_is_run_by_a_test() -> None:
    assert len(EXAMPLES) >= 20
    this_file = Path(__file__).read_text()
    for language, block in EXAMPLES:
        found = runs(block)
        assert len(found) == 1, f"```{language} block run by {found or 'no test'}:\n{block}"
    for target in RUN_HERE.values():
        assert f"def {target}(" in this_file, target
    for target in RUN_ELSEWHERE.values():
        path, _, name = target.partition("::")
        assert (ROOT / path).is_file(), target
        if name:
            assert f"def {name}(" in (ROOT / path).read_text(), target


def console_commands(key: str) -> list[list[str]]:
    """The ``$ uv run framecast`` lines of the console block holding ``key``: argv after it."""
    (block,) = [text for language, text in EXAMPLES if language == "console" and key in text]
    return [
        shlex.split(line.removeprefix("$ uv run framecast ").split("  #")[0])
        for line in block.splitlines()
        if line.startswith("$ uv run framecast ")
    ]


def photos(directory: Path) -> None:
    """The images the README's examples name, made here (any photo would do)."""
    for name, colour in (
        ("elephant.jpg", (120, 120, 110)),
        ("a.jpg", (10, 200, 30)),
        ("b.jpg", (200, 10, 30)),
        ("cat.jpg", (180, 120, 60)),
        ("dog.png", (90, 60, 30)),
    ):
        Image.new("RGB", (640, 480), colour).save(directory / name)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    photos(tmp_path)
    return tmp_path


def test_the_readme_has_the_five_examples() -> None:
    assert len(BLOCKS) == 5
    assert 'wire="jpeg", quality=90' in BLOCKS[2]
    assert 'classify("elephant.jpg").top' in BLOCKS[0]
    assert "tritonclient.grpc" in BLOCKS[4]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(
    index: int,
    onnx_server: BackgroundServer,
    in_tmp: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (in_tmp / "camera").mkdir()
    for i in range(5):
        Image.new("RGB", (320, 240), (i * 40, 90, 200)).save(in_tmp / "camera" / f"{i}.png")
    code = BLOCKS[index].replace("localhost:50051", onnx_server.address)
    # The camera example reads a directory of frames instead of a network camera.
    code = code.replace('"rtsp://camera.local/stream1"', '"camera"')
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert out.strip(), "every example prints what it got"
    if index == 0:
        assert out.startswith("Predicted: ")
    if "AsyncClient" in code:
        assert [line.split()[0] for line in out.splitlines()] == ["a.jpg", "b.jpg"]
    if 'wire="jpeg"' in code:
        assert out.strip() == "('raw', 'jpeg', 'png')"
    if "tritonclient" in code:  # three classes, best first
        lines = out.splitlines()
        assert len(lines) == 3
        probabilities = [float(line.rsplit("(", 1)[1].rstrip("%)")) for line in lines]
        assert probabilities == sorted(probabilities, reverse=True)


def test_quick_start_demo_runs(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (block,) = [t for _, t in EXAMPLES if "framecast demo" in t]
    assert block.strip() == "python3 -m pip install uv && python3 -m uv run framecast demo"
    # `uv run framecast demo` with the test's model cache, and no network to try.
    monkeypatch.setenv("FRAMECAST_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "generated:sunset.jpg" in out
    assert "3 requests, latency per request" in out


@pytest.fixture
def serve_process(in_tmp: Path, cache_dir: Path) -> Iterator[Callable[[list[str]], str]]:
    """Run a README ``framecast serve`` line as a process on a free port; returns its address."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str]) -> str:
        port_file = in_tmp / "port"
        test_flags = ["--port", "0", "--port-file", str(port_file), "--backend", "null"]
        command = [sys.executable, "-m", "framecast_client.cli", *argv, *test_flags]
        process = subprocess.Popen([*command, "--offline", "--cache-dir", str(cache_dir)])
        started.append(process)
        wait_until(
            lambda: port_file.exists() or process.poll() is not None,
            "the server to listen",
            timeout_s=120,
        )
        assert process.poll() is None, "the server exited"
        return f"127.0.0.1:{port_file.read_text().strip()}"

    yield start
    for process in started:
        process.terminate()
        assert process.wait(timeout=60) == 0


def test_command_line_example_runs(
    serve_process: Callable[[list[str]], str], capsys: pytest.CaptureFixture[str]
) -> None:
    serve, classify, info = console_commands("shell 1")
    assert serve == ["serve"]
    address = serve_process(serve)
    assert main([*classify, "--address", address]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["image", "label", "probability", "ms/image"]
    assert [row.split()[0] for row in table[1:]] == ["cat.jpg", "dog.png"]
    assert main([*info, "--address", address]) == 0
    assert "backend        null" in capsys.readouterr().out


@pytest.mark.slow  # the example streams for the 10 s it says
def test_stream_example_runs(
    serve_process: Callable[[list[str]], str], capsys: pytest.CaptureFixture[str]
) -> None:
    (stream,) = console_commands("framecast stream")
    address = serve_process(["serve"])
    assert main([*stream, "--address", address]) == 0
    out = capsys.readouterr().out
    assert "frames" in out


@pytest.mark.slow
def test_bench_examples_run(
    serve_process: Callable[[list[str]], str], in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    sweep, rate, compare = console_commands("framecast bench localhost:50051 --concurrency")
    (oip,) = console_commands("--protocol oip")
    address = serve_process(["serve"])
    # As written, on the test's server, with short steps (the figures are not the point).
    short = ["--warmup", "0", "--window", "0.3", "--max-windows", "3"]
    for argv in (sweep, rate, oip):
        assert main([address if a == "localhost:50051" else a for a in argv] + short) == 0
    for name in ("run.json", "run.csv", "run.png"):
        assert (in_tmp / name).stat().st_size > 0, name
    shutil.copy(in_tmp / "run.json", in_tmp / "before.json")
    shutil.copy(in_tmp / "run.json", in_tmp / "after.json")
    capsys.readouterr()
    assert main(compare) == 0
    assert capsys.readouterr().out.strip()


def test_bench_camera_examples_run(
    serve_process: Callable[[list[str]], str], in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    sweep, search = console_commands("framecast bench localhost:50051 --cameras")
    address = serve_process(["serve"])
    # As written, with short steps and a small fleet (the figures are not the point).
    short = ["--warmup", "0.2", "--window", "0.3", "--max-windows", "2"]
    fleet = ["--cameras", "1,4"]
    assert main([address if a == "localhost:50051" else a for a in sweep] + short + fleet) == 0
    for name in ("cams.json", "cams.csv", "cams.png"):
        assert (in_tmp / name).stat().st_size > 0, name
    capsys.readouterr()
    argv = [address if a == "localhost:50051" else a for a in search]
    assert main([*argv, *short, "--max-cameras", "2"]) == 0
    assert "find-max: " in capsys.readouterr().out


@pytest.mark.parametrize(("shorter_side", "scale"), [(1080, 1), (2319, 1), (2320, 2), (4640, 4)])
def test_what_the_readme_says_of_reduced_decoding(shorter_side: int, scale: int) -> None:
    # "at least 10 times the output ... 1/2 from 10 times, 1/4 from 20 ... 2,320 pixels or
    # more ... a 1080p frame is decoded in full".
    assert "1/2 from 10 times, 1/4 from 20, 1/8 from 40" in README
    assert "(`_DRAFT_HEADROOM` in `preprocess.py`)" in README
    assert _DRAFT_HEADROOM == 5  # the README's "at least 5 times" and its 10x = 2 x 5
    data = io.BytesIO()
    Image.new("RGB", (shorter_side * 16 // 9, shorter_side)).save(data, format="JPEG")
    data.seek(0)
    assert _draft(Image.open(data), PreprocessSpec(resize_size=232), 1) == scale
