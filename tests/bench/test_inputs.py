"""Inputs are preprocessed once and timed; payloads cycle through them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from framecast_bench.inputs import (
    InputError,
    directory_sources,
    make_payloads,
    prepare_inputs,
    synthetic_sources,
    video_sources,
)
from numpy.typing import NDArray
from PIL import Image


class CountingPreprocess:
    """Shrinks frames to 8x8 by slicing; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, item: object) -> NDArray[np.uint8]:
        self.calls += 1
        if isinstance(item, bytes):
            item = np.asarray(Image.open(io.BytesIO(item)).convert("RGB"))
        assert isinstance(item, np.ndarray)
        return np.ascontiguousarray(item[:8, :8])


def test_each_input_is_preprocessed_once_plus_one_untimed_warmup() -> None:
    pre = CountingPreprocess()
    ticks = iter(float(i) for i in range(100))
    inputs = prepare_inputs(
        synthetic_sources(5, 32, 24, seed=1), pre, "synthetic", clock=lambda: next(ticks) / 1000.0
    )
    assert pre.calls == 6
    assert inputs.frames.shape == (5, 8, 8, 3)
    assert inputs.frames.dtype == np.uint8
    # The fake clock advances 1 ms between reads: each timed call measured 1 ms.
    np.testing.assert_allclose(inputs.preprocess_ms, 1.0)
    assert len(inputs) == 5


def test_synthetic_frames_differ_and_repeat_with_the_seed() -> None:
    a = list(synthetic_sources(3, 16, 8, seed=4))
    b = list(synthetic_sources(3, 16, 8, seed=4))
    assert a[0].shape == (8, 16, 3)
    assert not np.array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[2], b[2])


def test_unary_payloads_are_views_and_carry_their_preprocessing() -> None:
    inputs = prepare_inputs(synthetic_sources(4, 16, 16), CountingPreprocess(), "s")
    payloads = make_payloads(inputs, 1)
    assert len(payloads) == 4
    assert all(p.images == 1 for p in payloads)
    assert np.shares_memory(payloads[2].batch, inputs.frames)
    assert payloads[3].preprocess_ms == pytest.approx(float(inputs.preprocess_ms[3]))


def test_batch_payloads_cycle_through_the_inputs() -> None:
    inputs = prepare_inputs(synthetic_sources(5, 16, 16), CountingPreprocess(), "s")
    payloads = make_payloads(inputs, 3)
    assert len(payloads) == 5
    assert payloads[1].batch.shape == (3, 8, 8, 3)
    # Payload 1 holds inputs 3, 4, 0.
    np.testing.assert_array_equal(payloads[1].batch[2], inputs.frames[0])
    assert payloads[1].preprocess_ms == pytest.approx(float(inputs.preprocess_ms[[3, 4, 0]].sum()))
    # The memory budget bounds the copies, to at least one payload.
    assert len(make_payloads(inputs, 3, memory_budget_bytes=1)) == 1


def test_image_directory(tmp_path: Path) -> None:
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (20, 10), color).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    inputs = prepare_inputs(directory_sources(tmp_path, 2), CountingPreprocess(), str(tmp_path))
    assert len(inputs) == 2
    assert inputs.frames[0, 0, 0].tolist() == [255, 0, 0]
    assert inputs.frames[1, 0, 0].tolist() == [0, 255, 0]


def test_empty_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no images"):
        list(directory_sources(tmp_path, 10))


def test_video_without_pyav_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "av", None)
    with pytest.raises(InputError, match="PyAV"):
        list(video_sources(tmp_path / "clip.mp4", 10))


def test_video_frames(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(6):
            rgb = np.full((48, 64, 3), 40 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = list(video_sources(path, 4))
    assert len(frames) == 4
    assert frames[0].shape == (48, 64, 3)
    # Lossy, but the grey levels come through roughly.
    assert abs(int(frames[3].mean()) - 120) < 10
    inputs = prepare_inputs(iter(frames), CountingPreprocess(), str(path))
    assert len(inputs) == 4
