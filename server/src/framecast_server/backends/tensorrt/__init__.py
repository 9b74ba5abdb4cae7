"""TensorRT FP16 backend: build an engine from the served ONNX, cache it per GPU, serve it.

Importing this package is cheap and safe on any machine: TensorRT and pycuda are imported
only inside ``build_engine`` / ``create_tensorrt_backend``, after the availability check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..base import Backend, BackendUnavailableError
from .availability import tensorrt_unavailable_reason
from .settings import EngineSettings

if TYPE_CHECKING:
    from .cache import BuildFn, BuildResult, EngineCache, EngineSpec

__all__ = [
    "EngineSettings",
    "build_engine",
    "create_tensorrt_backend",
    "tensorrt_unavailable_reason",
]

logger = logging.getLogger(__name__)

# The engine is built for and served on the first visible GPU; pick another with
# CUDA_VISIBLE_DEVICES, which keeps the cache key (GPU name) honest.
DEVICE_INDEX = 0


@dataclass(frozen=True, slots=True)
class _Plan:
    cache: EngineCache
    spec: EngineSpec
    build: BuildFn
    device_name: str


def _require_available() -> None:
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(reason)


def _plan(onnx_path: Path, settings: EngineSettings, cache_dir: Path) -> _Plan:
    # Fail fast, before hashing a 100 MB model or importing anything heavy.
    _require_available()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")

    import onnx

    import tensorrt as trt

    from ...model.fp16 import converter_version
    from . import cuda
    from .builder import build_plan, combine_timing_caches
    from .cache import EngineCache, EngineSpec, sha256_file

    device = cuda.device_info(DEVICE_INDEX)
    spec = EngineSpec(
        model_sha256=sha256_file(onnx_path),
        tensorrt_version=str(trt.__version__),
        gpu_name=device.name,
        compute_capability=device.compute_capability,
        precision=settings.precision,
        profile=settings.profile,
        builder_optimization_level=settings.builder_optimization_level,
        workspace_bytes=settings.workspace_bytes,
        converter=converter_version(),
    )

    def build(timing_cache: bytes | None) -> BuildResult:
        return build_plan(onnx.load(str(onnx_path)), settings, timing_cache)

    cache = EngineCache(cache_dir, merge_timing=combine_timing_caches)
    return _Plan(cache, spec, build, device.name)


def build_engine(onnx_path: Path, settings: EngineSettings, cache_dir: Path) -> Path:
    """Build the FP16 engine for ``onnx_path`` (or reuse the cached one); return the plan path.

    ``cache_dir`` is the cache root (plans go to ``cache_dir/engines``). Raises
    BackendUnavailableError with the reason when this machine cannot run TensorRT, before any
    heavy work; OnnxParseError / EngineBuildError when the build fails.
    """
    plan = _plan(onnx_path, settings, cache_dir)
    return plan.cache.get_or_build(plan.spec, plan.build).path


def create_tensorrt_backend(onnx_path: Path, settings: EngineSettings, cache_dir: Path) -> Backend:
    """Build or load the engine for ``onnx_path`` and return a running TensorRTBackend.

    A cached plan that TensorRT refuses to deserialize (e.g. the driver changed underneath
    it) is discarded and rebuilt once. Raises BackendUnavailableError when this machine
    cannot run TensorRT.
    """
    from .backend import EngineDeserializeError, TensorRTBackend

    plan = _plan(onnx_path, settings, cache_dir)
    cached = plan.cache.get_or_build(plan.spec, plan.build)
    try:
        return TensorRTBackend(
            cached.data, settings, device_name=plan.device_name, device_index=DEVICE_INDEX
        )
    except EngineDeserializeError as exc:
        if cached.built:
            raise
        # Under the lock, and only the plan refused here: another worker may have rebuilt it.
        plan.cache.invalidate(plan.spec, str(exc), refused=cached.data)
        cached = plan.cache.get_or_build(plan.spec, plan.build)
        return TensorRTBackend(
            cached.data, settings, device_name=plan.device_name, device_index=DEVICE_INDEX
        )
