"""Can this machine run the TensorRT backend? Answers without importing TensorRT at import time.

``import tensorrt`` alone proves nothing: the type stubs install an empty ``tensorrt``
namespace package, so the check looks for the real runtime (``tensorrt.Builder``), for pycuda,
and for a CUDA device through the driver library itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import importlib.util
import logging
import shutil
import sys

logger = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10
INSTALL_HINT = "install framecast-server[gpu] with NVIDIA's index; see docs/gpu.md"

_CUDA_LIBRARY_NAMES = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")


def _load_libcuda() -> ctypes.CDLL | None:
    for name in _CUDA_LIBRARY_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    found = ctypes.util.find_library("cuda")
    if found is None:
        return None
    try:
        return ctypes.CDLL(found)
    except OSError:
        return None


def gpu_problem() -> str | None:
    """None if the CUDA driver reports at least one device, else what is wrong.

    Calls ``cuInit`` in this process (cheap, idempotent). CUDA does not survive ``fork()``: a
    server that forks workers should check in each worker, not before forking.
    """
    libcuda = _load_libcuda()
    if libcuda is None:
        how = "nvidia-smi present but " if shutil.which("nvidia-smi") else "nvidia-smi/"
        return f"no NVIDIA GPU found ({how}libcuda not present)"
    status = libcuda.cuInit(0)
    if status != 0:
        return f"NVIDIA driver found but cuInit failed with CUDA error {status} (no usable GPU)"
    count = ctypes.c_int(0)
    status = libcuda.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return f"cuDeviceGetCount failed with CUDA error {status}"
    if count.value < 1:
        return "NVIDIA driver found but it reports no CUDA device"
    return None


def _installed(name: str) -> bool:
    # Already imported counts as installed (find_spec raises for modules without __spec__).
    return name in sys.modules or importlib.util.find_spec(name) is not None


def pycuda_problem() -> str | None:
    """None if pycuda is installed (found, not imported), else what is missing."""
    if not _installed("pycuda"):
        return "pycuda not installed"
    return None


def tensorrt_problem() -> str | None:
    """None if the TensorRT Python runtime (not just its stubs) imports and is new enough."""
    if not _installed("tensorrt"):
        return "tensorrt runtime not installed"
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:
        # The real package raises when libnvinfer is missing or built for another CUDA.
        return f"tensorrt runtime failed to load ({exc})"
    if not (hasattr(trt, "Builder") and hasattr(trt, "Runtime")):
        # An empty namespace package: tensorrt-stubs (or a broken install) without the runtime.
        return "tensorrt runtime not installed (only type stubs or an empty package found)"
    version = str(getattr(trt, "__version__", "0"))
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        return f"tensorrt {version} is too old (need {MIN_TENSORRT_MAJOR}.x or newer)"
    return None


def tensorrt_unavailable_reason() -> str | None:
    """None when a usable GPU, the TensorRT runtime and pycuda are all present.

    Otherwise a one-line message naming everything that is missing, for logs and for
    ``BackendUnavailableError``. Never raises.
    """
    problems = [p for p in (gpu_problem(), pycuda_problem(), tensorrt_problem()) if p is not None]
    if not problems:
        return None
    return f"TensorRT backend unavailable: {'; '.join(problems)} ({INSTALL_HINT})"
