"""Typed failures of the TensorRT backend; each names the call that failed."""

from __future__ import annotations

from ..base import BackendError


class TensorRTBackendError(BackendError):
    """A step of building, caching or running a TensorRT engine failed.

    ``call`` names the failing API call (``"cuMemAlloc"``-style names are not guaranteed; it is
    the Python-level call, e.g. ``"pycuda.driver.mem_alloc"`` or ``"execute_async_v3"``).
    """

    def __init__(self, call: str, detail: str) -> None:
        super().__init__(f"{call} failed: {detail}")
        self.call = call
        self.detail = detail


class CudaError(TensorRTBackendError):
    """A CUDA driver call (through pycuda) failed."""


class StickyCudaError(CudaError):
    """A CUDA error that poisons the context (illegal address, launch failure, ...).

    Every later call in this process fails too: the backend is broken and the process must
    restart to get a working GPU context.
    """


class TensorRTCallError(TensorRTBackendError):
    """A TensorRT runtime call returned failure (False or None)."""


class EngineBuildError(TensorRTBackendError):
    """Building the engine failed (parser, unsupported TensorRT version, builder)."""


class OnnxParseError(EngineBuildError):
    """TensorRT's ONNX parser rejected the model; ``errors`` holds its descriptions."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("OnnxParser.parse", "; ".join(errors) or "no error description")
        self.errors = errors


class EngineMismatchError(TensorRTBackendError):
    """The engine's I/O tensors are not the served contract (uint8 images in, fp32 out)."""


class EngineCacheError(TensorRTBackendError):
    """The engine cache could not produce a valid plan (lock timeout, unwritable directory)."""
