"""A GPU stand-in for hosts without TensorRT: ResNet-50 FP16 through PyTorch, as a backend.

Benchmark-only (benchmarks/gpu_feeding.py ``--standin torch``): never a dependency of the
product, and torch is imported only when the stand-in is made, so this module imports
anywhere. It goes through the backend interface like every backend, so both serving designs
(per-worker, shared) drive a real GPU with it. Its batches are counted host-wide through the
simulated device's counters (backends/simulated.py) with the measured time of each batch, so
the benchmark reads batch sizes and the GPU's busy fraction the same way for both devices;
those figures are MEASURED, not simulated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from framecast_server.backends.base import BackendError, BackendInfo
from framecast_server.backends.simulated import SimulatedDevice
from numpy.typing import NDArray

# ImageNet normalization, as the model's preset (torchvision's ResNet-50 weights) expects.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def torch_unavailable_reason() -> str | None:
    """Why the stand-in cannot run here (no torch, torchvision or CUDA device); None if it can."""
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError as exc:
        return f"PyTorch is not installed ({exc.name} missing)"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return None


class TorchStandIn:
    """ResNet-50 (random weights: the cost, not the answers, matters) in FP16 on CUDA device 0."""

    def __init__(self, max_batch: int, counters: Path | None = None) -> None:
        reason = torch_unavailable_reason()
        if reason is not None:
            raise BackendError(reason)
        import torch
        import torchvision

        self._torch: Any = torch
        self._max_batch = max_batch
        self._device = torch.device("cuda", 0)
        model = torchvision.models.resnet50(weights=None)
        self._model = model.eval().half().to(self._device)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(_MEAN, device=self._device).view(shape).half() * 255
        self._std = torch.tensor(_STD, device=self._device).view(shape).half() * 255
        self._counters = None if counters is None else SimulatedDevice(counters)
        name = torch.cuda.get_device_name(self._device)
        self._info = BackendInfo(name="torch-standin", precision="fp16", device=name)

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Upload, normalize, run, softmax, download: one batch, synchronously."""
        torch = self._torch
        n = int(images.shape[0])
        if not 1 <= n <= self._max_batch:
            raise BackendError(f"batch of {n} outside 1..{self._max_batch}")
        started = time.monotonic_ns()
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(images)).to(self._device)
            batch = (batch.permute(0, 3, 1, 2).half() - self._mean) / self._std
            probabilities = torch.softmax(self._model(batch).float(), dim=1)
            out: NDArray[np.float32] = probabilities.cpu().numpy()
        if self._counters is not None:
            self._counters.record(n, time.monotonic_ns() - started)
        return out

    def close(self) -> None:
        if self._counters is not None:
            self._counters.close()


@dataclass(frozen=True, slots=True)
class TorchStandInFactory:
    """A picklable ``(onnx path) -> backend`` for the server processes of the benchmark."""

    max_batch: int
    counters: str

    def __call__(self, _onnx_path: Path) -> TorchStandIn:
        return TorchStandIn(self.max_batch, Path(self.counters))
