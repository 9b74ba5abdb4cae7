"""Helpers shared by tests (importable thanks to pytest's pythonpath = tests)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from framecast_server.backends.base import BackendInfo
from framecast_server.settings import ServerSettings
from numpy.typing import NDArray

INPUT_SIZE = 224


def make_settings(cache_dir: Path, **overrides: Any) -> ServerSettings:
    """Settings for an in-process test server: port 0, offline, small batches."""
    values: dict[str, Any] = {
        "port": 0,
        "backend": "onnxruntime",
        "allow_download": False,
        "cache_dir": cache_dir,
        "max_batch": 8,
        "threads": 2,
    }
    values.update(overrides)
    return ServerSettings(**values)


def random_frames(count: int, *, seed: int = 0, size: int = INPUT_SIZE) -> NDArray[np.uint8]:
    """Preprocessed-size uint8 RGB frames, different from each other."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


class GatedBackend:
    """A backend that holds each batch until ``release`` is set: makes "in flight" observable.

    It records the first pixel value of every image it ran in ``seen``, so a test can tell
    which requests reached it and which were dropped before compute.
    """

    def __init__(self, max_batch: int = 8) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[int] = []
        self._max_batch = max_batch

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("gated", "fp32", "cpu")

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.seen.extend(int(v) for v in images[:, 0, 0, 0])
        self.entered.set()
        if not self.release.wait(30):
            raise RuntimeError("never released")
        return np.full((len(images), 1000), 1e-3, dtype=np.float32)

    def close(self) -> None:
        self.release.set()
