"""ONNX Runtime on the CPU: the backend of every machine without an NVIDIA GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from .base import BackendError, BackendInfo

logger = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """Runs the prepared ONNX graph (uint8 NHWC in, probabilities out) with ONNX Runtime."""

    def __init__(self, model_path: Path, *, max_batch: int, threads: int | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise BackendError(f"ONNX Runtime could not load {model_path}: {exc}") from exc
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._max_batch = max_batch
        self._info = BackendInfo(name="onnxruntime", precision="fp32", device="cpu")
        logger.info("ONNX Runtime %s loaded %s", ort.__version__, model_path.name)

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_concurrent_batches(self) -> int:
        # One batch at a time: ONNX Runtime already spreads one batch over all the cores.
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Classify one batch of uint8 [N, H, W, 3] images."""
        if not 1 <= len(images) <= self._max_batch:
            raise BackendError(f"batch of {len(images)} outside 1..{self._max_batch}")
        try:
            (probabilities,) = self._session.run([self._output], {self._input: images})
        except Exception as exc:
            raise BackendError(f"ONNX Runtime failed on a batch of {len(images)}: {exc}") from exc
        return np.asarray(probabilities, dtype=np.float32)

    def close(self) -> None:
        # The session frees its memory when dropped; nothing else is held.
        del self._session
