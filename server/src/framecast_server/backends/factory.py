"""Choose and create the backend a server runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .base import Backend

if TYPE_CHECKING:
    from .tensorrt.settings import EngineSettings

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
    engine: EngineSettings | None = None,
) -> Backend:
    """Create the named backend; ``auto`` takes TensorRT where it can run, else ONNX Runtime.

    ``engine`` is how TensorRT builds its engine (default: EngineSettings for ``max_batch``),
    the same settings `framecast build-engine` takes, so a server finds the engine it built.
    Under ``auto`` a TensorRT that is missing, or that cannot parse, build or load the engine,
    leaves the server on ONNX Runtime; a failure of a TensorRT that is there is a warning
    naming it. Heavy imports happen here, not at module import, so a CPU server never imports
    TensorRT.
    """
    if name in ("auto", "tensorrt"):
        from .tensorrt import EngineSettings, create_tensorrt_backend

        settings = EngineSettings(max_batch=max_batch) if engine is None else engine
        if settings.max_batch != max_batch:
            raise ValueError(
                f"engine max batch {settings.max_batch} differs from the server's {max_batch}"
            )
    if name == "auto":
        from .tensorrt.availability import tensorrt_unavailable_reason
        from .tensorrt.errors import TensorRTBackendError

        reason = tensorrt_unavailable_reason()
        if reason is not None:
            logger.info("backend auto: serving with ONNX Runtime on the CPU because %s", reason)
        else:
            try:
                return create_tensorrt_backend(onnx_path, settings, cache_dir=cache_dir)
            except TensorRTBackendError as exc:
                # TensorRT is here but this model or GPU defeats it: say so loudly, since the
                # CPU is an order of magnitude slower, and serve rather than not at all.
                logger.warning(
                    "backend auto: TensorRT is installed but failed (%s: %s); serving with "
                    "ONNX Runtime on the CPU instead (--backend tensorrt makes this fatal)",
                    type(exc).__name__,
                    exc,
                )
        name = "onnxruntime"
    if name == "tensorrt":
        return create_tensorrt_backend(onnx_path, settings, cache_dir=cache_dir)
    if name == "null":
        from .null import NullBackend

        return NullBackend(max_batch=max_batch)
    from .onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(onnx_path, max_batch=max_batch, threads=threads)
