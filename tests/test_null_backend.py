"""The null backend: deterministic, input-keyed probabilities with no model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from framecast_server.backends.base import Backend, BackendError, BackendInfo, GatheringBackend
from framecast_server.backends.null import NullBackend
from framecast_server.core.batcher import Batcher, BatcherSettings
from numpy.typing import NDArray

SIZE = 8


def keyed(*keys: int, size: int = SIZE) -> NDArray[np.uint8]:
    """Random-looking images whose first byte is each key."""
    rng = np.random.default_rng(sum(keys) + len(keys))
    images = rng.integers(0, 256, size=(len(keys), size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = keys
    return images


def test_is_a_backend_with_null_info() -> None:
    backend = NullBackend(max_batch=4)
    assert isinstance(backend, Backend)
    assert backend.info == BackendInfo("null", "fp32", "cpu")
    assert (backend.max_batch, backend.num_classes, backend.input_size) == (4, 1000, 224)


def test_top_class_is_the_first_byte_modulo_the_classes() -> None:
    backend = NullBackend(max_batch=8, num_classes=10, input_size=SIZE)
    keys = [0, 3, 9, 10, 255, 17]
    out = backend.infer(keyed(*keys))
    assert out.dtype == np.float32
    assert out.shape == (len(keys), 10)
    assert out.argmax(axis=1).tolist() == [k % 10 for k in keys]


def test_rows_are_distributions_ranked_from_the_key() -> None:
    backend = NullBackend(max_batch=4, num_classes=1000, input_size=SIZE)
    out = backend.infer(keyed(7, 200))
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert (out > 0).all()
    for row, key in zip(out, (7, 200), strict=True):
        order = np.argsort(-row, kind="stable")
        # Strictly decreasing from the key onwards: top-k is key, key+1, ... with no ties.
        assert order.tolist() == [(key + j) % 1000 for j in range(1000)]
        assert len(np.unique(row)) == 1000
    assert 0.5 < out[0, 7] < 0.7  # a peaked, softmax-like top-1


def test_output_depends_only_on_the_key() -> None:
    backend = NullBackend(max_batch=4, num_classes=50, input_size=SIZE)
    a = keyed(5, 6)
    b = keyed(5, 6)
    b[:, 1:, :, :] = 255 - b[:, 1:, :, :]  # everything but the first pixel differs
    np.testing.assert_array_equal(backend.infer(a), backend.infer(b))
    np.testing.assert_array_equal(backend.infer(a), backend.infer(a))
    assert not np.array_equal(backend.infer(keyed(5)), backend.infer(keyed(6)))


def test_single_class_is_certain() -> None:
    backend = NullBackend(max_batch=2, num_classes=1, input_size=SIZE)
    np.testing.assert_array_equal(backend.infer(keyed(3, 4)), np.ones((2, 1), dtype=np.float32))


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((1, SIZE + 1, SIZE, 3), dtype=np.uint8),
        np.zeros((1, SIZE, SIZE, 3), dtype=np.float32),
        np.zeros((SIZE, SIZE, 3), dtype=np.uint8),
        np.zeros((0, SIZE, SIZE, 3), dtype=np.uint8),
        np.zeros((5, SIZE, SIZE, 3), dtype=np.uint8),
    ],
)
def test_bad_batches_raise_backend_error(images: NDArray[np.uint8]) -> None:
    with pytest.raises(BackendError):
        NullBackend(max_batch=4, num_classes=10, input_size=SIZE).infer(images)


def test_closed_backend_refuses_to_infer() -> None:
    backend = NullBackend(max_batch=4, input_size=SIZE)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.infer(keyed(1))


@pytest.mark.parametrize(
    "kwargs",
    [{"max_batch": 0}, {"max_batch": 1, "num_classes": 0}, {"max_batch": 1, "input_size": 0}],
)
def test_bad_construction_is_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        NullBackend(**kwargs)


async def test_results_through_the_batcher_match_the_frames() -> None:
    backend = NullBackend(max_batch=8, num_classes=100, input_size=SIZE)
    batcher = Batcher(backend, BatcherSettings(max_batch=8, max_delay_us=1000))
    await batcher.start()
    try:
        requests = [list(range(start, start + n)) for start, n in ((0, 3), (50, 1), (120, 4))]
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(keyed(*keys)) for keys in requests)), 30
        )
    finally:
        await batcher.close()
    for keys, items in zip(requests, outcomes, strict=True):
        assert [int(item.probabilities.argmax()) for item in items] == [k % 100 for k in keys]


def test_infer_parts_answers_as_infer_of_the_joined_batch() -> None:
    backend = NullBackend(max_batch=4, input_size=8)
    assert isinstance(backend, GatheringBackend)  # the batcher hands it the parts unjoined
    parts = [np.full((n, 8, 8, 3), key, np.uint8) for n, key in ((1, 7), (2, 200), (1, 3))]
    joined = backend.infer(np.concatenate(parts))
    np.testing.assert_array_equal(backend.infer_parts(parts), joined)
    assert backend.infer_parts(parts).argmax(axis=1).tolist() == [7, 200, 200, 3]
    with pytest.raises(BackendError, match="outside"):
        backend.infer_parts([*parts, parts[0]])
    with pytest.raises(BackendError, match="expected uint8"):
        backend.infer_parts([parts[0], np.zeros((1, 4, 4, 3), np.uint8)])
