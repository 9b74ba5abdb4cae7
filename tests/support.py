"""Helpers shared by tests (importable thanks to pytest's pythonpath = tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
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
