"""Can this machine run the TensorRT backend? Answers without importing TensorRT at import time.

``import tensorrt`` alone proves nothing (an empty namespace package imports too, and a runtime
built for CUDA 13 imports fine on a driver that cannot run it), so the check asks the CUDA driver
for a device and its CUDA version, imports pycuda's driver module, and on a GPU makes the
process's TensorRT logger, a ``trt.Builder`` and a ``trt.Runtime``: the first TensorRT calls that
touch the GPU, and the ones that fail when the runtime cannot work here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import importlib.metadata
import importlib.util
import logging
import shutil
import sys
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SUPPORTED_TENSORRT_MAJORS = (10, 11)
INSTALL_HINT = (
    "see docs/gpu.md: the TensorRT container (deploy/gpu.Dockerfile), or "
    "framecast-server[gpu-cu12] (TensorRT 10, driver r535+) / [gpu-cu13] (TensorRT 11, "
    "driver r580+) from NVIDIA's index"
)
# The oldest Linux driver branch NVIDIA supports for TensorRT's wheels of each CUDA major.
DRIVER_FOR_CUDA = {12: "r535", 13: "r580"}

_CUDA_LIBRARY_NAMES = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")


@dataclass(frozen=True, slots=True)
class GpuState:
    """What the CUDA driver says: a problem (None when a device is there) and its CUDA version."""

    problem: str | None
    cuda_version: tuple[int, int] | None = None


def load_libcuda() -> ctypes.CDLL | None:
    """The CUDA driver library, or None where it is not installed."""
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


def gpu_state() -> GpuState:
    """Ask the driver library for a device and the highest CUDA version it supports.

    Calls ``cuInit`` in this process (cheap, idempotent). CUDA does not survive ``fork()``: a
    server that forks workers should check in each worker, not before forking.
    """
    libcuda = load_libcuda()
    if libcuda is None:
        how = "nvidia-smi present but " if shutil.which("nvidia-smi") else "nvidia-smi/"
        return GpuState(f"no NVIDIA GPU found ({how}libcuda not present)")
    status = libcuda.cuInit(0)
    if status != 0:
        return GpuState(
            f"NVIDIA driver found but cuInit failed with CUDA error {status} (no usable GPU)"
        )
    count = ctypes.c_int(0)
    status = libcuda.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return GpuState(f"cuDeviceGetCount failed with CUDA error {status}")
    if count.value < 1:
        return GpuState("NVIDIA driver found but it reports no CUDA device")
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return GpuState(None)
    return GpuState(None, (version.value // 1000, version.value % 1000 // 10))


def gpu_problem() -> str | None:
    """None if the CUDA driver reports at least one device, else what is wrong."""
    return gpu_state().problem


def _installed(name: str) -> bool:
    # Already imported counts as installed (find_spec raises for modules without __spec__).
    return name in sys.modules or importlib.util.find_spec(name) is not None


def pycuda_problem() -> str | None:
    """None if pycuda's driver module imports (its extension is built for this CUDA)."""
    if not _installed("pycuda"):
        return "pycuda not installed"
    try:
        importlib.import_module("pycuda.driver")
    except (ImportError, OSError) as exc:
        return f"pycuda failed to load ({exc}); rebuild it against this CUDA"
    return None


def tensorrt_cuda_major() -> int | None:
    """The CUDA major the installed TensorRT wheels are built for, from their names.

    None when TensorRT did not come from NVIDIA's -cu12/-cu13 wheels (a container or a system
    package), where the Builder creation below is the only test.
    """
    for major in (13, 12):
        for name in (f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}-bindings"):
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            return major
    return None


def _version_problem(version: str) -> str | None:
    major = version.split(".", 1)[0]
    if not major.isdigit():
        return f"tensorrt version {version!r} is not a release version"
    if int(major) not in SUPPORTED_TENSORRT_MAJORS:
        wanted = " or ".join(f"{m}.x" for m in SUPPORTED_TENSORRT_MAJORS)
        return f"tensorrt {version} is not supported (need {wanted})"
    return None


def _driver_problem(version: str, driver_cuda: tuple[int, int] | None) -> str | None:
    needed = tensorrt_cuda_major()
    if needed is None or driver_cuda is None or driver_cuda[0] >= needed:
        return None
    have = f"{driver_cuda[0]}.{driver_cuda[1]}"
    return (
        f"tensorrt {version} is built for CUDA {needed} but the NVIDIA driver runs CUDA {have} at "
        f"most (CUDA {needed} needs driver {DRIVER_FOR_CUDA.get(needed, 'newer')} or newer; or "
        f"install framecast-server[gpu-cu{driver_cuda[0]}])"
    )


def tensorrt_problem(gpu: GpuState | None = None) -> str | None:
    """None if the TensorRT runtime imports, is a supported version and (on a GPU) works.

    Without ``gpu`` (or with a GPU problem) only the import and version are checked: a Builder
    cannot be made without a device, and the GPU problem is reported on its own.
    """
    if not _installed("tensorrt"):
        return "tensorrt runtime not installed"
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:
        # The real package raises when libnvinfer is missing or built for another CUDA.
        return f"tensorrt runtime failed to load ({exc})"
    missing = [name for name in ("Logger", "Builder", "Runtime") if not hasattr(trt, name)]
    if missing:
        # An empty namespace package (type stubs, a broken install) or something else entirely.
        return f"tensorrt runtime not installed (the `tensorrt` found has no {', '.join(missing)})"
    version = str(getattr(trt, "__version__", ""))
    problem = _version_problem(version)
    if problem is not None or gpu is None or gpu.problem is not None:
        return problem
    problem = _driver_problem(version, gpu.cuda_version)
    if problem is not None:
        return problem
    return _runtime_problem(trt, version)


def _runtime_problem(trt: object, version: str) -> str | None:
    from .trt_logging import process_logger

    try:
        trt_logger = process_logger()
    except Exception as exc:  # the binding raises whatever its constructor raised
        return f"tensorrt {version}: creating the logger failed ({exc})"
    for name in ("Builder", "Runtime"):
        try:
            created = getattr(trt, name)(trt_logger)
        except Exception as exc:  # pybind11 raises TypeError etc. when the C++ factory fails
            return f"tensorrt {version}: trt.{name} could not be created on this GPU ({exc})"
        if created is None:
            return f"tensorrt {version}: trt.{name} could not be created on this GPU"
        del created
    return None


def tensorrt_unavailable_reason() -> str | None:
    """None when a usable GPU, a working TensorRT runtime and pycuda are all present.

    Otherwise a one-line message naming everything that is missing, for logs and for
    ``BackendUnavailableError``. Never raises.
    """
    gpu = gpu_state()
    problems = [p for p in (gpu.problem, pycuda_problem(), tensorrt_problem(gpu)) if p is not None]
    if not problems:
        return None
    return f"TensorRT backend unavailable: {'; '.join(problems)} ({INSTALL_HINT})"
