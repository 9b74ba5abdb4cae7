"""Choose and create the backend a server runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from .base import Backend

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "onnxruntime", "tensorrt", "null"]
BACKEND_NAMES: tuple[BackendName, ...] = ("auto", "onnxruntime", "tensorrt", "null")


def create_backend(
    name: BackendName,
    onnx_path: Path,
    *,
    max_batch: int,
    threads: int | None,
    cache_dir: Path,
) -> Backend:
    """Create the named backend; ``auto`` takes TensorRT where it can run, else ONNX Runtime.

    Heavy imports happen here, not at module import, so a CPU server never imports TensorRT.
    """
    if name == "auto":
        from .tensorrt.availability import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason()
        if reason is None:
            name = "tensorrt"
        else:
            logger.info("backend auto: serving with ONNX Runtime on the CPU because %s", reason)
            name = "onnxruntime"
    if name == "tensorrt":
        from .tensorrt import EngineSettings, create_tensorrt_backend

        return create_tensorrt_backend(
            onnx_path, EngineSettings(max_batch=max_batch), cache_dir=cache_dir
        )
    if name == "null":
        from .null import NullBackend

        return NullBackend(max_batch=max_batch)
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(onnx_path, max_batch=max_batch, threads=threads)
