"""The benchmark's GPU stand-in (benchmarks/gpu_standin.py): ResNet-50 FP16 through PyTorch.

Marked ``cuda`` (a GPU, no TensorRT needed) and skipped, with the reason, where PyTorch or a
CUDA device is missing; torch is imported only after that check, so collection works anywhere.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from framecast_server.backends.base import Backend, BackendError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from gpu_standin import TorchStandIn, torch_unavailable_reason

pytestmark = pytest.mark.cuda


def test_the_stand_in_classifies_a_batch_through_the_backend_interface(tmp_path: Path) -> None:
    reason = torch_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    backend = TorchStandIn(max_batch=8, counters=tmp_path / "counters")
    assert isinstance(backend, Backend)
    images = np.random.default_rng(0).integers(0, 256, (8, 224, 224, 3), dtype=np.uint8)
    rows = backend.infer(images)
    assert rows.shape == (8, 1000)
    assert rows.dtype == np.float32
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-3)
    assert backend.info.precision == "fp16"
    backend.close()


def test_without_pytorch_the_stand_in_says_why() -> None:
    reason = torch_unavailable_reason()
    if reason is None:
        pytest.skip("PyTorch with CUDA is here")
    with pytest.raises(BackendError, match="PyTorch"):
        TorchStandIn(max_batch=8)
