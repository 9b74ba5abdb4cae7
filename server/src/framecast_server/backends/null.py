"""A backend that does no inference: for measuring the serving overhead around the model.

Its output is deterministic and cheap, yet depends on each image, so results can be checked
against the frames that were sent:

* the *key* of an image is the value of its first byte, ``images[i, 0, 0, 0]`` (the red channel
  of the top-left pixel);
* the row for an image is a fixed, strictly decreasing distribution ``p[j] = (1 / (j + 1)**2) / Z``
  (``Z`` normalizes it to sum to 1; ``p[0]`` is about 0.61 for 1000 classes), rotated so that
  class ``(key + j) % num_classes`` gets ``p[j]``.

So the top-1 class is ``key % num_classes``, the top-k classes are ``key, key + 1, ...,
key + k - 1`` (mod ``num_classes``) in that order with no ties, and every row sums to 1. The cost
is one gather of N x num_classes floats, no matter how large the images are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from .base import BackendError, BackendInfo


class NullBackend:
    """Fixed, input-keyed probabilities with no model behind them (see the module docstring)."""

    def __init__(self, max_batch: int, num_classes: int = 1000, input_size: int = 224) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if input_size < 1:
            raise ValueError(f"input_size must be at least 1, got {input_size}")
        self._max_batch = max_batch
        self._num_classes = num_classes
        self._input_size = input_size
        weights = 1.0 / np.arange(1, num_classes + 1, dtype=np.float64) ** 2
        distribution = (weights / weights.sum()).astype(np.float32)
        # One row per possible key (a uint8): row k is the distribution rotated to peak at class
        # k % C, so infer is a single gather of N rows (no arithmetic per call).
        keys = np.arange(256, dtype=np.intp)[:, None]
        rotation = (np.arange(num_classes, dtype=np.intp)[None, :] - keys) % num_classes
        self._rows: NDArray[np.float32] = distribution[rotation]
        self._info = BackendInfo(name="null", precision="fp32", device="cpu")
        self._closed = False

    @property
    def info(self) -> BackendInfo:
        """``BackendInfo("null", "fp32", "cpu")``."""
        return self._info

    @property
    def max_batch(self) -> int:
        """Largest N that ``infer`` accepts."""
        return self._max_batch

    @property
    def max_concurrent_batches(self) -> int:
        """One batch at a time."""
        return 1

    @property
    def num_classes(self) -> int:
        """Width C of each output row."""
        return self._num_classes

    @property
    def input_size(self) -> int:
        """Height and width the images must have."""
        return self._input_size

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """Return float32 [N, num_classes]; row i peaks at class ``images[i, 0, 0, 0] % C``.

        Raises BackendError for a closed backend or input that is not uint8
        [N, input_size, input_size, 3] with 1 <= N <= max_batch, as a real backend would.
        """
        self._check(images)
        if not 1 <= images.shape[0] <= self._max_batch:
            raise BackendError(f"batch of {images.shape[0]} outside 1..{self._max_batch}")
        # out[i, c] = p[(c - key_i) % C]: class key_i gets p[0], class key_i + 1 gets p[1], ...
        probabilities: NDArray[np.float32] = self._rows[images[:, 0, 0, 0]]
        return probabilities

    def infer_parts(self, parts: Sequence[NDArray[np.uint8]]) -> NDArray[np.float32]:
        """``infer`` of the parts as one batch, without joining them: like TensorRT's, which
        copies each part straight to where it goes, so the overhead measured around this
        backend has no batch-sized host copy that the GPU backend does not make."""
        if not parts:
            raise BackendError("a batch of no parts")
        if len(parts) == 1:
            return self.infer(parts[0])
        keys = []
        for part in parts:
            self._check(part)
            keys.append(part[:, 0, 0, 0])
        if not 1 <= sum(k.shape[0] for k in keys) <= self._max_batch:
            raise BackendError(f"batch outside 1..{self._max_batch}")
        probabilities: NDArray[np.float32] = self._rows[np.concatenate(keys)]
        return probabilities

    def close(self) -> None:
        """Mark the backend closed; ``infer`` raises afterwards."""
        self._closed = True

    def _check(self, images: NDArray[np.uint8]) -> None:
        if self._closed:
            raise BackendError("the null backend is closed")
        size = self._input_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise BackendError(
                f"expected uint8 [N, {size}, {size}, 3], got {images.dtype} {list(images.shape)}"
            )
