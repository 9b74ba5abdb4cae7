"""Availability: the reason on this GPU-less machine, and no heavy imports at import time."""

from __future__ import annotations

import subprocess
import sys
import types
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


def test_reason_on_this_machine_names_everything_missing() -> None:
    # This machine has no GPU, no pycuda, and only the tensorrt type stubs.
    reason = tensorrt_unavailable_reason()
    assert reason is not None
    assert reason.startswith("TensorRT backend unavailable: ")
    assert "no NVIDIA GPU found" in reason
    assert "pycuda not installed" in reason
    assert "tensorrt runtime not installed" in reason
    assert "framecast-server[gpu]" in reason


def test_stub_only_tensorrt_is_not_mistaken_for_the_runtime() -> None:
    import tensorrt  # type: ignore[import-untyped, unused-ignore]

    assert not hasattr(tensorrt, "Builder")  # the premise: stubs only on this machine
    assert availability.tensorrt_problem() is not None


def test_all_present_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(availability, "gpu_problem", lambda: None)
    monkeypatch.setattr(availability, "pycuda_problem", lambda: None)
    monkeypatch.setattr(availability, "tensorrt_problem", lambda: None)
    assert tensorrt_unavailable_reason() is None


@pytest.mark.parametrize(
    ("version", "ok"), [("10.3.0.30", True), ("11.0.0.1", True), ("8.6.1", False)]
)
def test_tensorrt_version_gate(monkeypatch: pytest.MonkeyPatch, version: str, ok: bool) -> None:
    fake = types.ModuleType("tensorrt")
    fake.Builder = object  # type: ignore[attr-defined]
    fake.Runtime = object  # type: ignore[attr-defined]
    fake.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    problem = availability.tensorrt_problem()
    assert (problem is None) == ok, problem


def test_only_one_problem_is_reported_when_only_one_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(availability, "gpu_problem", lambda: None)
    monkeypatch.setattr(availability, "tensorrt_problem", lambda: None)
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
