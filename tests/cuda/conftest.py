"""The cuda suite: the backend's CUDA half (pycuda, real GPU) with a kernel for the engine.

Needs an NVIDIA GPU, pycuda and nvcc (pycuda compiles the kernels); skips with the reason
otherwise. TensorRT is not needed: a fake ``tensorrt`` whose engine launches a real kernel.
"""

from __future__ import annotations

import os
import shutil
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest
from framecast_server.backends.tensorrt import availability


def cuda_unavailable_reason() -> str | None:
    """None when a GPU, pycuda and nvcc are all here; else what is missing."""
    problems = [p for p in (availability.gpu_problem(), availability.pycuda_problem()) if p]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if shutil.which("nvcc") is None and not (Path(cuda_home) / "bin" / "nvcc").is_file():
        problems.append("nvcc not found (pycuda compiles the suite's kernels with it)")
    return "; ".join(problems) or None


@pytest.fixture(scope="session")
def cuda_ready() -> None:
    """Skip (with the reason) unless a GPU, pycuda and nvcc are present."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(f"cuda suite needs a GPU, pycuda and nvcc: {reason}")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if shutil.which("nvcc") is None:
        os.environ["PATH"] = f"{cuda_home}/bin{os.pathsep}{os.environ['PATH']}"


@pytest.fixture
def kernel_trt(cuda_ready: None, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fake ``tensorrt`` in sys.modules whose engine runs KernelEngine on the real GPU."""
    from framecast_server.backends.tensorrt import cuda
    from trt_backend.trt_fakes import make_fake_trt

    from .kernels import KernelEngine

    engine = KernelEngine()
    fake = make_fake_trt("10.13.0.35")
    fake.execute = engine
    fake.kernel_engine = engine
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    original = cuda.CudaStream.__init__

    def register(self: cuda.CudaStream) -> None:
        original(self)
        engine.streams[self.handle] = weakref.ref(self)

    monkeypatch.setattr(cuda.CudaStream, "__init__", register)
    return fake
