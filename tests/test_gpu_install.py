"""The GPU install paths as documented: extras, container image, scripts; checked here, where
no GPU is (the scripts' GPU part runs on GPU hosts)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from framecast_server.backends.tensorrt.availability import DRIVER_FOR_CUDA

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
GPU_DOC = (ROOT / "docs" / "gpu.md").read_text()
DOCKERFILE = (ROOT / "deploy" / "gpu.Dockerfile").read_text()


def _toml(path: Path) -> dict[str, Any]:
    tomllib: Any = pytest.importorskip("tomllib")  # Python 3.11+
    data: dict[str, Any] = tomllib.loads(path.read_text())
    return data


def test_server_extras_name_their_cuda_and_pin_tensorrt_majors() -> None:
    extras = _toml(ROOT / "server" / "pyproject.toml")["project"]["optional-dependencies"]
    assert extras == {
        "gpu-cu12": ["tensorrt-cu12>=10.3,<11", "pycuda>=2024.1.2"],
        "gpu-cu13": ["tensorrt-cu13>=11,<12", "pycuda>=2025.1.2"],  # pycuda's first for CUDA 13
    }
    root = _toml(ROOT / "pyproject.toml")
    assert root["project"]["optional-dependencies"] == {
        "gpu-cu12": ["framecast-server[gpu-cu12]"],
        "gpu-cu13": ["framecast-server[gpu-cu13]"],
    }
    # The stubs stay out of the project environment: never in a default group.
    groups = root["dependency-groups"]
    assert root["tool"]["uv"]["default-groups"] == ["dev"]
    assert not any("tensorrt" in d for d in groups["dev"])
    assert groups["trt-stubs"] == ["tensorrt-stubs>=10.3"]


@pytest.mark.parametrize("text", [README, GPU_DOC], ids=["README", "docs/gpu.md"])
def test_docs_name_the_extras_and_drivers_the_code_checks(text: str) -> None:
    for major, driver in DRIVER_FOR_CUDA.items():
        assert re.search(rf"gpu-cu{major}.*?{driver}", text, flags=re.S), (major, driver)
    assert "tensorrt-cu12>=10.3,<11" in GPU_DOC
    assert "deploy/gpu.Dockerfile" in text


def test_container_image_is_pinned_non_root_with_a_cache_volume() -> None:
    (tag,) = re.findall(
        r"^ARG TENSORRT_IMAGE=(nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3)$", DOCKERFILE, flags=re.M
    )
    assert tag in README
    assert tag in GPU_DOC
    assert re.search(r"^FROM \$\{TENSORRT_IMAGE\}$", DOCKERFILE, flags=re.M)
    assert re.search(r"^USER 10001:10001$", DOCKERFILE, flags=re.M)
    assert re.search(r"^VOLUME /var/cache/framecast$", DOCKERFILE, flags=re.M)
    assert "FRAMECAST_CACHE_DIR=/var/cache/framecast" in DOCKERFILE
    # Entrypoint and command as the CPU image has them: the Kubernetes GPU overlay replaces the
    # command (args) and keeps `framecast`.
    assert re.search(r'^ENTRYPOINT \["framecast"\]$', DOCKERFILE, flags=re.M)
    # The command spans continuation lines ("\\" at a line's end): joined, as Docker reads it.
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE.replace("\\\n", ""), flags=re.M)
    assert cmd is not None
    assert cmd.group(1).startswith('["serve"')
    assert '"--backend", "tensorrt"' in cmd.group(1)
    for copied in re.findall(r"^COPY (\S+) ", DOCKERFILE, flags=re.M):
        assert (ROOT / copied).exists(), copied
    assert "deploy/install.sh /opt/framecast" in DOCKERFILE
    assert "--system-site-packages /opt/framecast" in DOCKERFILE
    # pycuda (built in the image against its CUDA) at the version uv.lock pins, read from it.
    (install,) = [line for line in DOCKERFILE.splitlines() if "uv pip install" in line]
    found = re.search(r'"pycuda==\$\((awk .*? uv\.lock)\)"', install)
    assert found is not None, install
    pinned = subprocess.run(
        ["sh", "-c", found.group(1)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    locked = [p["version"] for p in _toml(ROOT / "uv.lock")["package"] if p["name"] == "pycuda"]
    assert [pinned] == locked
    assert tuple(int(x) for x in pinned.split(".")) >= (2025, 1, 2)


def test_the_cuda_marker_is_registered() -> None:
    markers = _toml(ROOT / "pyproject.toml")["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("cuda:") for m in markers)
    assert any(m.startswith("gpu:") for m in markers)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_gpu_check_says_how_to_call_it_and_what_is_missing(tmp_path: Path) -> None:
    usage = _run("scripts/gpu_check.sh")
    assert (usage.returncode, usage.stderr.strip()) == (
        2,
        "usage: scripts/gpu_check.sh WHEELS_DIR LOG_DIR",
    )
    empty = _run("scripts/gpu_check.sh", str(tmp_path), str(tmp_path / "logs"))
    assert empty.returncode == 2
    assert "no pycuda-*.tar.gz" in empty.stderr
    assert "scripts/download_gpu_wheels.sh" in empty.stderr


def test_download_script_says_how_to_call_it() -> None:
    usage = _run("scripts/download_gpu_wheels.sh")
    assert (usage.returncode, usage.stderr.strip()) == (
        2,
        "usage: scripts/download_gpu_wheels.sh [--full] DIR",
    )


def test_scripts_are_executable() -> None:
    for name in ("gpu_check.sh", "download_gpu_wheels.sh"):
        assert (ROOT / "scripts" / name).stat().st_mode & 0o111, name
    assert sys.executable  # the suites' own interpreter runs the scripts' python parts


def _junit(path: Path, tests: int, skipped: int) -> None:
    path.write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" '
        f'skipped="{skipped}" failures="0" errors="0"></testsuite></testsuites>'
    )


@pytest.mark.parametrize(
    ("gpu_skipped", "trt_line", "status", "trt_claim"),
    [
        (0, "TensorRT backend available", 0, "proved:     TensorRT"),
        # A GPU host without TensorRT: the cuda suite ran, the gpu suite skipped everything.
        (7, "TensorRT backend unavailable: tensorrt runtime not installed", 4, "NOT proven: Tens"),
        (7, "TensorRT backend available", 4, "NOT proven: TensorRT"),
    ],
    ids=["tensorrt ran", "no tensorrt", "gpu suite skipped"],
)
def test_gpu_check_verdict_is_partial_unless_the_tensorrt_suite_ran(
    tmp_path: Path, gpu_skipped: int, trt_line: str, status: int, trt_claim: str
) -> None:
    _junit(tmp_path / "cuda.xml", 6, 0)
    _junit(tmp_path / "gpu.xml", 7, gpu_skipped)
    (tmp_path / "trt.log").write_text(f"loading...\n{trt_line}\n")
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check_verdict.py", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == status, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("proved:     CUDA half of the backend on this GPU (6/6")
    assert lines[1].startswith(trt_claim)
    if status:
        assert trt_line in lines[1]
    # Without the stand-in benchmark's results, no run claims to have measured feeding.
    assert lines[2].startswith("NOT proven: front-end-to-GPU feeding")


def test_gpu_check_verdict_says_feeding_was_measured_only_with_both_designs(
    tmp_path: Path,
) -> None:
    _junit(tmp_path / "cuda.xml", 6, 0)
    _junit(tmp_path / "gpu.xml", 7, 7)
    (tmp_path / "trt.log").write_text("TensorRT backend unavailable: not installed\n")
    rows = [{"design": "per-worker", "front_ends": 2}]
    (tmp_path / "gpu_feeding.json").write_text(json.dumps({"rows": rows}))
    command = [sys.executable, "scripts/gpu_check_verdict.py", str(tmp_path)]
    one = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert one.stdout.splitlines()[2].startswith("NOT proven: front-end-to-GPU feeding")
    rows.append({"design": "shared", "front_ends": 2})
    (tmp_path / "gpu_feeding.json").write_text(json.dumps({"rows": rows}))
    both = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert both.returncode == 4  # still partial: TensorRT did not run
    assert both.stdout.splitlines()[2].startswith("measured:   front-end-to-GPU feeding")


def test_gpu_check_verdict_without_logs_proves_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "scripts/gpu_check_verdict.py", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 4
    assert [line.split(":")[0] for line in done.stdout.splitlines()] == ["NOT proven"] * 3
