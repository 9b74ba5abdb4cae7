"""Top-k selection over class probabilities."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def top_k(probabilities: NDArray[np.float32], k: int) -> tuple[list[int], list[float]]:
    """Indices and probabilities of the k largest entries of a 1-D vector, best first.

    Plain lists: the caller puts them into protobuf messages, which take Python numbers.
    """
    if not 1 <= k <= probabilities.shape[-1]:
        raise ValueError(f"k must be in 1..{probabilities.shape[-1]}, got {k}")
    if k == 1:  # the common case (cameras ask for the top class): argmax is ~10x cheaper
        best = int(probabilities.argmax())
        return [best], [float(probabilities[best])]
    # argpartition is O(C); only the k survivors get sorted.
    candidates = np.argpartition(probabilities, -k)[-k:]
    order = candidates[np.argsort(probabilities[candidates])[::-1]]
    indices: list[int] = order.tolist()
    values: list[float] = probabilities[order].tolist()
    return indices, values
