"""Availability: the reason on this GPU-less machine, each check against a fake TensorRT, and no
heavy imports at import time."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from framecast_server.backends.base import BackendUnavailableError
from framecast_server.backends.tensorrt import (
    EngineSettings,
    availability,
    build_engine,
    create_tensorrt_backend,
    tensorrt_unavailable_reason,
)
from framecast_server.backends.tensorrt.availability import GpuState
from framecast_server.backends.tensorrt.trt_logging import process_logger

from .trt_fakes import make_fake_trt


def test_reason_on_this_machine_names_everything_missing() -> None:
    # Our machines have no GPU, no pycuda and no TensorRT (the stubs live outside the venv).
    if availability.gpu_problem() is None or importlib.util.find_spec("pycuda") is not None:
        pytest.skip("this machine has a GPU or pycuda: nothing is missing to name")
    reason = tensorrt_unavailable_reason()
    assert reason is not None
    assert reason.startswith("TensorRT backend unavailable: ")
    assert "no NVIDIA GPU found" in reason
    assert "pycuda not installed" in reason
    assert "tensorrt runtime not installed" in reason
    assert "framecast-server[gpu-cu12]" in reason
    assert "deploy/gpu.Dockerfile" in reason


def test_the_project_environment_holds_no_empty_tensorrt() -> None:
    # tensorrt-stubs would install an importable, empty `tensorrt`; uv keeps it out (pyproject).
    # On a GPU host (uv sync --extra gpu-cu12) the real package is a regular one, with code.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("tensorrt-stubs")
    spec = importlib.util.find_spec("tensorrt")
    if spec is not None:
        assert spec.origin is not None, "tensorrt is an empty namespace package"
        assert spec.origin.endswith("__init__.py")


def test_an_empty_tensorrt_namespace_is_not_mistaken_for_the_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the stubs' wheel installs: a `tensorrt/` directory of .pyi files, no __init__.py.
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    problem = availability.tensorrt_problem()
    assert problem is not None
    assert problem.startswith("tensorrt runtime not installed")
    assert "Logger, Builder, Runtime" in problem


def _all_but_tensorrt_ok(monkeypatch: pytest.MonkeyPatch, cuda: tuple[int, int]) -> None:
    monkeypatch.setattr(availability, "gpu_state", lambda: GpuState(None, cuda))
    monkeypatch.setattr(availability, "pycuda_problem", lambda: None)


def test_all_present_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    _all_but_tensorrt_ok(monkeypatch, (13, 0))
    monkeypatch.setattr(availability, "tensorrt_problem", lambda gpu: None)
    assert tensorrt_unavailable_reason() is None


@pytest.mark.parametrize(
    ("version", "ok"),
    [("10.3.0.30", True), ("11.0.0.1", True), ("8.6.1", False), ("12.0.0.1", False)],
)
def test_tensorrt_version_gate(monkeypatch: pytest.MonkeyPatch, version: str, ok: bool) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(version))
    problem = availability.tensorrt_problem()
    assert (problem is None) == ok, problem
    if not ok:
        assert problem == f"tensorrt {version} is not supported (need 10.x or 11.x)"


def test_working_runtime_makes_builder_and_runtime_with_the_process_logger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = make_fake_trt("10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    _all_but_tensorrt_ok(monkeypatch, (12, 8))
    assert tensorrt_unavailable_reason() is None
    assert [kind for kind, _ in fake.created] == ["Builder", "Runtime"]
    assert {id(logger) for _, logger in fake.created} == {id(process_logger())}


@pytest.mark.parametrize("failing", ["Builder", "Runtime"])
def test_runtime_that_cannot_start_is_named(monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    fake = make_fake_trt("10.13.0.35")
    fake.fail_create = {failing}
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    _all_but_tensorrt_ok(monkeypatch, (12, 8))
    reason = tensorrt_unavailable_reason()
    assert reason is not None
    assert f"tensorrt 10.13.0.35: trt.{failing} could not be created on this GPU" in reason


def test_driver_too_old_for_the_wheels_cuda_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake_trt("11.4.0.106")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(availability, "tensorrt_cuda_major", lambda: 13)
    _all_but_tensorrt_ok(monkeypatch, (12, 4))
    reason = tensorrt_unavailable_reason()
    assert reason is not None
    assert (
        "tensorrt 11.4.0.106 is built for CUDA 13 but the NVIDIA driver runs CUDA 12.4 at most "
        "(CUDA 13 needs driver r580 or newer; or install framecast-server[gpu-cu12])"
    ) in reason
    assert fake.created == []  # never got as far as touching the GPU


def test_without_a_gpu_tensorrt_is_only_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = make_fake_trt("10.13.0.35")
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(availability, "gpu_state", lambda: GpuState("no NVIDIA GPU found (x)"))
    monkeypatch.setattr(availability, "pycuda_problem", lambda: None)
    reason = tensorrt_unavailable_reason()
    assert (
        reason
        == f"TensorRT backend unavailable: no NVIDIA GPU found (x) ({availability.INSTALL_HINT})"
    )
    assert fake.created == []


def test_only_one_problem_is_reported_when_only_one_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(availability, "gpu_state", lambda: GpuState(None, (12, 8)))
    monkeypatch.setattr(availability, "tensorrt_problem", lambda gpu: None)
    reason = tensorrt_unavailable_reason()
    assert reason is not None
    assert "pycuda not installed" in reason
    assert "GPU" not in reason.split("(")[0]


@pytest.mark.parametrize("entry", [build_engine, create_tensorrt_backend])
def test_entry_points_fail_fast_with_the_reason(tmp_path: Path, entry: object) -> None:
    missing = tmp_path / "does-not-exist.onnx"  # never read: the check comes first
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU found"):
        entry(missing, EngineSettings(), tmp_path)  # type: ignore[operator]
    assert not (tmp_path / "engines").exists()


def test_importing_the_package_imports_neither_tensorrt_nor_pycuda() -> None:
    code = (
        "import sys\n"
        "import framecast_server.backends.tensorrt as t\n"
        "import framecast_server.backends.tensorrt.availability\n"
        "import framecast_server.backends.tensorrt.cache\n"
        "import framecast_server.backends.tensorrt.builder\n"
        "import framecast_server.backends.tensorrt.backend\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorrt', 'pycuda'})\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_collecting_the_gpu_suite_imports_neither_tensorrt_nor_pycuda() -> None:
    gpu_tests = Path(__file__).resolve().parent.parent / "gpu" / "test_tensorrt_gpu.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpu_suite', {str(gpu_tests)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'tensorrt', 'pycuda'})\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
