"""top_k returns the k most probable classes, best first, for every k including the fast k=1."""

from __future__ import annotations

import numpy as np
import pytest
from framecast_server.core.topk import top_k


@pytest.mark.parametrize("k", [1, 2, 5, 1000])
def test_top_k_matches_a_full_sort(k: int) -> None:
    rng = np.random.default_rng(k)
    probabilities = rng.random(1000, dtype=np.float32)
    indices, values = top_k(probabilities, k)
    expected = np.argsort(probabilities)[::-1][:k]
    assert indices == expected.tolist()
    assert values == probabilities[expected].tolist()
    assert all(type(i) is int for i in indices)
    assert all(type(v) is float for v in values)


@pytest.mark.parametrize("k", [0, 1001])
def test_top_k_outside_the_classes_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match=r"k must be in 1\.\.1000"):
        top_k(np.zeros(1000, dtype=np.float32), k)
