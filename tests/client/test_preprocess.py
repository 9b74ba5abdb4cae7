"""Client preprocessing: accuracy against a float reference, every input kind, every error.

The acceptance line: the output of ``preprocess`` differs from the textbook pipeline (decode
at full resolution, antialiased bilinear resize of the shorter side in float, center crop) by
at most 0.5 grey levels on average and 8 at the worst pixel, at every size from 1x to 10x the
resize target (the sweep below), and by at most 1.5 on average for the odd inputs elsewhere.
The reference below is written independently of the implementation: Pillow's float ("F")
resize of the whole image, then a numpy crop.
"""

from __future__ import annotations

import functools
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framecast_client.errors import InvalidImageError
from framecast_client.preprocess import (
    ChannelOrder,
    ImageInput,
    Interpolation,
    PreprocessSpec,
    is_image_input,
    preprocess,
)
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageOps, JpegImagePlugin

DEFAULT = PreprocessSpec()
MAX_MEAN_ABS_DIFF = 1.5

# (width, height): 1080p both ways, VGA, 12 MP, square, smaller than the crop, very wide.
SIZES = [(1920, 1080), (1080, 1920), (640, 480), (4000, 3000), (300, 300), (150, 100), (2000, 300)]
SIZE_IDS = [f"{w}x{h}" for w, h in SIZES]

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


# --- helpers --------------------------------------------------------------------------------


@functools.cache
def _synthetic(width: int, height: int, seed: int) -> NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    # Smooth ramps in different directions per channel (so flips and rotations show), waves
    # of a few periods, sharp-edged shapes and lines, and sensor-like noise.
    wave = 60 * np.sin(x / (width / 13 + 1)) * np.cos(y / (height / 9 + 1))
    rgb = np.stack(
        [40 + 170 * x / width + wave, 30 + 190 * y / height - wave, 128 + wave], axis=-1
    ) + rng.normal(0, 4, (height, width, 3))
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(2, max(3, width // 5)))
        y1 = y0 + int(rng.integers(2, max(3, height // 5)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x1, y1), fill=color)
        line = [int(rng.integers(0, width)), int(rng.integers(0, height))] * 2
        line[2:] = [int(rng.integers(0, width)), int(rng.integers(0, height))]
        draw.line(line, fill=color[::-1], width=2)
    frame = np.asarray(image)
    frame.flags.writeable = False  # cached and shared between tests
    return frame


def synthetic(width: int, height: int, seed: int = 0) -> NDArray[np.uint8]:
    """A deterministic ``height x width`` RGB test picture: smooth but detailed."""
    return _synthetic(width, height, seed)


def encode(image: NDArray[np.uint8] | Image.Image, fmt: str = "JPEG", **params: Any) -> bytes:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    if fmt == "JPEG":
        params.setdefault("quality", 90)
    buffer = io.BytesIO()
    pil.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode_full(data: bytes) -> NDArray[np.uint8]:
    """Decode at full resolution, no draft, EXIF orientation applied."""
    with Image.open(io.BytesIO(data)) as pil:
        upright = ImageOps.exif_transpose(pil)
        return np.asarray(upright.convert("RGB"))


def reference(
    rgb: NDArray[np.uint8], spec: PreprocessSpec, interpolation: Interpolation = "bilinear"
) -> NDArray[np.float32]:
    """The textbook pipeline in float: resize the whole image, then center-crop."""
    height, width = rgb.shape[:2]
    if spec.resize_policy == "stretch":
        size = (spec.input_width, spec.input_height)
    elif width <= height:
        size = (spec.resize_size, int(spec.resize_size * height / width))
    else:
        size = (int(spec.resize_size * width / height), spec.resize_size)
    channels = [
        np.asarray(
            Image.fromarray(rgb[:, :, c].astype(np.float32)).resize(size, _RESAMPLE[interpolation])
        )
        for c in range(3)
    ]
    resized = np.stack(channels, axis=-1)
    top = round((size[1] - spec.input_height) / 2.0)
    left = round((size[0] - spec.input_width) / 2.0)
    return resized[top : top + spec.input_height, left : left + spec.input_width]


def mean_abs_diff(a: NDArray[Any], b: NDArray[Any]) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def assert_output(out: NDArray[np.uint8], spec: PreprocessSpec = DEFAULT) -> None:
    assert out.shape == (spec.input_height, spec.input_width, 3)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


# --- PreprocessSpec -------------------------------------------------------------------------


def test_spec_defaults_are_the_resnet_pipeline() -> None:
    expected = PreprocessSpec(224, 224, "shorter_side_then_center_crop", 256, "bilinear")
    assert expected == DEFAULT


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"input_height": 0}, "input_height"),
        ({"input_width": -3}, "input_width"),
        ({"resize_size": 0}, "resize_size"),
        ({"input_height": 224.0}, "input_height"),
        ({"input_width": True}, "input_width"),
        ({"resize_policy": "fit"}, "resize_policy"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"resize_size": 200}, "smaller than the 224x224 crop"),
        ({"input_width": 300, "resize_size": 256}, "smaller than the 224x300 crop"),
    ],
)
def test_spec_rejects_invalid_values(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        PreprocessSpec(**kwargs)


def test_spec_stretch_does_not_need_resize_size_to_cover_the_input() -> None:
    spec = PreprocessSpec(input_height=300, input_width=300, resize_policy="stretch")
    assert spec.resize_size == 256


# --- accuracy: the acceptance line ----------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), SIZES, ids=SIZE_IDS)
def test_jpeg_matches_full_resolution_reference(width: int, height: int) -> None:
    data = encode(synthetic(width, height))
    out = preprocess(data, DEFAULT)
    assert_output(out)
    assert mean_abs_diff(out, reference(decode_full(data), DEFAULT)) <= MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize(("width", "height"), SIZES, ids=SIZE_IDS)
def test_numpy_frame_matches_full_resolution_reference(width: int, height: int) -> None:
    frame = synthetic(width, height)
    out = preprocess(frame, DEFAULT)
    assert_output(out)
    assert mean_abs_diff(out, reference(frame, DEFAULT)) <= MAX_MEAN_ABS_DIFF


# --- the sweep: every ratio of image to resize target, 1x to 10x ----------------------------

SWEEP_MAX_MEAN_ABS_DIFF = 0.5
SWEEP_MAX_ABS_DIFF = 8.0
# Both presets: torchvision's crop at the V2 weights' 232 and at the classic 256, and the
# caffe preset's stretch to 224.
SWEEP_SPECS = {
    "torchvision-232": PreprocessSpec(resize_size=232),
    "torchvision-256": PreprocessSpec(resize_size=256),
    "caffe-stretch": PreprocessSpec(resize_policy="stretch"),
}
# Shorter side over the resize target (224 for stretch). The exact powers of two are where
# JPEG draft mode can do all the shrinking; 2.2 and 4.6 sit just past them (1080p is
# 4.2x a 256 resize, 4.7x a 232 one).
SWEEP_RATIOS = [1.0, 1.5, 2.0, 2.2, 3.0, 4.0, 4.6, 6.0, 8.0, 10.0]


def _sweep_size(spec: PreprocessSpec, ratio: float, orientation: str) -> tuple[int, int]:
    target = spec.resize_size if spec.resize_policy != "stretch" else spec.input_height
    short = round(target * ratio)
    long = round(short * 4 / 3)
    return (long, short) if orientation == "landscape" else (short, long)


@functools.cache
def _sweep_case(
    spec_name: str, ratio: float, orientation: str
) -> tuple[NDArray[np.uint8], bytes, bytes, NDArray[np.float32], NDArray[np.float32]]:
    """The frame, its JPEG and PNG, and the references for the frame and for the decoded JPEG."""
    spec = SWEEP_SPECS[spec_name]
    width, height = _sweep_size(spec, ratio, orientation)
    # Cut from one large picture (made once: making a picture costs more than the test), the
    # middle of it so every cut has shapes and edges; portrait cuts from the picture turned.
    large = synthetic(*_sweep_size(SWEEP_SPECS["torchvision-256"], max(SWEEP_RATIOS), "landscape"))
    if orientation == "portrait":
        large = large.transpose(1, 0, 2)
    top = (large.shape[0] - height) // 2
    left = (large.shape[1] - width) // 2
    frame = np.ascontiguousarray(large[top : top + height, left : left + width])
    jpeg = encode(frame)
    png = encode(frame, "PNG", compress_level=1)
    return frame, jpeg, png, reference(frame, spec), reference(decode_full(jpeg), spec)


@pytest.mark.parametrize("kind", ["jpeg", "numpy", "png"])
@pytest.mark.parametrize("orientation", ["landscape", "portrait"])
@pytest.mark.parametrize("ratio", SWEEP_RATIOS, ids=[f"{r}x" for r in SWEEP_RATIOS])
@pytest.mark.parametrize("spec_name", list(SWEEP_SPECS))
def test_sweep_of_sizes_matches_reference(
    spec_name: str, ratio: float, orientation: str, kind: str
) -> None:
    spec = SWEEP_SPECS[spec_name]
    frame, jpeg, png, frame_reference, jpeg_reference = _sweep_case(spec_name, ratio, orientation)
    sources: dict[str, ImageInput] = {"jpeg": jpeg, "numpy": frame, "png": png}
    source = sources[kind]
    expected = jpeg_reference if kind == "jpeg" else frame_reference
    out = preprocess(source, spec)
    assert_output(out, spec)
    diff = np.abs(out.astype(np.float64) - expected)
    assert float(diff.mean()) <= SWEEP_MAX_MEAN_ABS_DIFF
    assert float(diff.max()) <= SWEEP_MAX_ABS_DIFF


def test_sweep_bounds_tell_draft_shrinking_apart() -> None:
    # The bounds must catch what the sweep is for: a JPEG at 2x the resize target decoded at
    # 1/2 by DCT scaling, with the antialiased resize doing almost nothing, is far off them.
    spec = SWEEP_SPECS["torchvision-256"]
    _, jpeg, _, _, expected = _sweep_case("torchvision-256", 2.0, "landscape")
    with Image.open(io.BytesIO(jpeg)) as pil:
        width = pil.size[0]
        pil.draft("RGB", (pil.size[0] // 2, pil.size[1] // 2))
        box = [v / 2 for v in _torchvision_box(width, pil.size[1] * 2, spec)]
        drafted = pil.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR, box=box)
    diff = np.abs(np.asarray(drafted).astype(np.float64) - expected)
    assert float(diff.mean()) > SWEEP_MAX_MEAN_ABS_DIFF
    assert float(diff.max()) > SWEEP_MAX_ABS_DIFF


def test_reference_tells_a_shifted_crop_apart() -> None:
    # The tolerance must not hide geometry mistakes: a crop two output pixels off fails it.
    frame = synthetic(1920, 1080)
    ref = reference(frame, DEFAULT)
    shifted = reference(frame, PreprocessSpec(input_width=228))[:, 4:]
    assert mean_abs_diff(shifted, ref) > MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize(
    "spec",
    [
        PreprocessSpec(resize_policy="stretch"),
        PreprocessSpec(input_height=160, input_width=320, resize_policy="stretch"),
    ],
    ids=["224x224", "160x320"],
)
@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (1080, 1920), (150, 100)])
def test_stretch_matches_reference(spec: PreprocessSpec, width: int, height: int) -> None:
    frame = synthetic(width, height)
    data = encode(frame)
    for source, rgb in ((frame, frame), (data, decode_full(data))):
        out = preprocess(source, spec)
        assert_output(out, spec)
        assert mean_abs_diff(out, reference(rgb, spec)) <= MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (1080, 1920), (2000, 300)])
def test_non_square_crop_matches_reference(width: int, height: int) -> None:
    spec = PreprocessSpec(input_height=192, input_width=256, resize_size=288)
    frame = synthetic(width, height)
    data = encode(frame)
    for source, rgb in ((frame, frame), (data, decode_full(data))):
        out = preprocess(source, spec)
        assert_output(out, spec)
        assert mean_abs_diff(out, reference(rgb, spec)) <= MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (640, 480), (150, 100)])
def test_bicubic_matches_reference(width: int, height: int) -> None:
    spec = PreprocessSpec(interpolation="bicubic")
    frame = synthetic(width, height)
    data = encode(frame)
    for source, rgb in ((frame, frame), (data, decode_full(data))):
        out = preprocess(source, spec)
        assert mean_abs_diff(out, reference(rgb, spec, "bicubic")) <= MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (640, 480), (150, 100)])
def test_nearest_picks_the_reference_pixels(width: int, height: int) -> None:
    spec = PreprocessSpec(interpolation="nearest")
    frame = synthetic(width, height)
    data = encode(frame)
    for source, rgb in ((frame, frame), (data, decode_full(data))):
        out = preprocess(source, spec)
        # Nearest is not drafted: the very same source pixels, except where a sample position
        # lies within rounding (Pillow's nearest is fixed-point) of a pixel edge and picks the
        # neighbour: a few whole columns or rows. A misplaced crop would differ almost everywhere.
        assert np.mean(out != reference(rgb, spec, "nearest")) < 0.02


# --- how it gets there: one resize of a box, JPEG draft -------------------------------------


def _torchvision_box(
    width: int, height: int, spec: PreprocessSpec
) -> tuple[float, float, float, float]:
    if width <= height:
        rw, rh = spec.resize_size, int(spec.resize_size * height / width)
    else:
        rw, rh = int(spec.resize_size * width / height), spec.resize_size
    top = round((rh - spec.input_height) / 2.0)
    left = round((rw - spec.input_width) / 2.0)
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + spec.input_width) * sx, (top + spec.input_height) * sy)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic"])
@pytest.mark.parametrize(("width", "height"), SIZES, ids=SIZE_IDS)
def test_frame_is_one_box_resize_of_the_whole_frame(
    width: int, height: int, interpolation: Interpolation
) -> None:
    # preprocess hands Pillow only the part of the frame the filter reads; the result must be
    # resizing the box out of the whole frame. Shifting the box by whole pixels changes float
    # rounding only: a filter tap cut off at the region's edge would change far more.
    spec = PreprocessSpec(interpolation=interpolation)
    frame = synthetic(width, height)
    whole = Image.fromarray(frame).resize(
        (224, 224),
        _RESAMPLE[interpolation],
        box=_torchvision_box(width, height, spec),
    )
    diff = np.abs(preprocess(frame, spec).astype(np.int16) - np.asarray(whole))
    if interpolation == "nearest":
        # A sample position within rounding of a pixel edge may pick the neighbour: a few
        # whole columns or rows, never more.
        assert np.mean(diff != 0) < 0.02
    else:
        assert diff.max() <= 1
        assert np.mean(diff != 0) < 0.001


@pytest.mark.parametrize(
    ("width", "height", "scale"),
    [(1920, 1080, 1), (1080, 1920, 1), (4000, 3000, 2), (3000, 4000, 2), (640, 480, 1)],
)
def test_jpeg_is_drafted_but_leaves_the_resize_its_headroom(
    monkeypatch: pytest.MonkeyPatch, width: int, height: int, scale: int
) -> None:
    drafted: list[tuple[float, float, float, float]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> Any:
        result = original(self, mode, size)
        assert result is not None
        drafted.append(result[1])
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    preprocess(encode(synthetic(width, height)), DEFAULT)
    [(_, _, right, bottom)] = drafted
    assert width / right == scale
    assert height / bottom == scale
    x0, y0, x1, y1 = _torchvision_box(width, height, DEFAULT)
    # The crop, in drafted pixels, still has at least 4 x 224 of them each way (unless it had
    # fewer to begin with, and then it is not drafted): the antialiased resize shrinks by 5x
    # or more, so DCT scaling's blockwise filter does not decide the result.
    assert (x1 - x0) / scale >= 5 * 224 or scale == 1
    assert (y1 - y0) / scale >= 5 * 224 or scale == 1


def test_nearest_is_not_drafted(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda *a: calls.append(a))
    preprocess(encode(synthetic(1920, 1080)), PreprocessSpec(interpolation="nearest"))
    assert calls == []


# --- channel orders, modes and formats ------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(1920, 1080), (300, 300), (224, 224)])
def test_bgr_frame_equals_rgb_frame(width: int, height: int) -> None:
    rgb = synthetic(width, height)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    expected = preprocess(rgb, DEFAULT)
    np.testing.assert_array_equal(preprocess(bgr, DEFAULT, channel_order="BGR"), expected)
    # A non-contiguous view works too.
    np.testing.assert_array_equal(
        preprocess(rgb[:, :, ::-1], DEFAULT, channel_order="BGR"), expected
    )
    # And the flip is not a no-op: reading BGR as RGB gives a different image.
    assert mean_abs_diff(preprocess(bgr, DEFAULT), expected) > 10


def test_bgra_frame_equals_rgb_frame() -> None:
    rgb = synthetic(640, 480)
    alpha = np.random.default_rng(1).integers(0, 256, (480, 640, 1), dtype=np.uint8)
    bgra = np.concatenate([rgb[:, :, ::-1], alpha], axis=-1)
    np.testing.assert_array_equal(
        preprocess(bgra, DEFAULT, channel_order="BGR"), preprocess(rgb, DEFAULT)
    )


def test_channel_order_is_ignored_for_decoded_images() -> None:
    data = encode(synthetic(640, 480))
    np.testing.assert_array_equal(
        preprocess(data, DEFAULT, channel_order="BGR"), preprocess(data, DEFAULT)
    )


@pytest.mark.parametrize("shape", [(480, 640), (480, 640, 1)])
def test_grayscale_frame_becomes_three_equal_channels(shape: tuple[int, ...]) -> None:
    gray = synthetic(640, 480)[:, :, 1].copy()
    out = preprocess(gray.reshape(shape), DEFAULT)
    assert_output(out)
    as_rgb = np.repeat(gray[:, :, np.newaxis], 3, axis=2)
    np.testing.assert_array_equal(out, preprocess(as_rgb, DEFAULT))


def test_rgba_frame_drops_alpha_without_premultiplying() -> None:
    rgb = synthetic(640, 480)
    alpha = np.random.default_rng(2).integers(0, 256, (480, 640, 1), dtype=np.uint8)
    alpha[:100] = 0  # fully transparent rows keep their colour too
    rgba = np.concatenate([rgb, alpha], axis=-1)
    np.testing.assert_array_equal(preprocess(rgba, DEFAULT), preprocess(rgb, DEFAULT))


def test_non_contiguous_views_are_accepted() -> None:
    frame = synthetic(1920, 1080)
    for view in (frame[::2, ::2], frame[100:900, 300:1700], frame.transpose(1, 0, 2)):
        assert not view.flags.c_contiguous
        np.testing.assert_array_equal(
            preprocess(view, DEFAULT), preprocess(np.ascontiguousarray(view), DEFAULT)
        )


def test_pil_image_equals_its_array() -> None:
    frame = synthetic(1920, 1080)
    np.testing.assert_array_equal(
        preprocess(Image.fromarray(frame), DEFAULT), preprocess(frame, DEFAULT)
    )


def test_png_is_lossless_so_equals_the_frame(tmp_path: Path) -> None:
    frame = synthetic(1280, 720)
    path = tmp_path / "frame.png"
    path.write_bytes(encode(frame, "PNG"))
    expected = preprocess(frame, DEFAULT)
    np.testing.assert_array_equal(preprocess(path, DEFAULT), expected)
    np.testing.assert_array_equal(preprocess(str(path), DEFAULT), expected)
    np.testing.assert_array_equal(preprocess(path.read_bytes(), DEFAULT), expected)


def test_rgba_png_drops_alpha() -> None:
    frame = synthetic(640, 480)
    alpha = np.full((480, 640, 1), 255, dtype=np.uint8)
    alpha[:, :320] = 0
    data = encode(np.concatenate([frame, alpha], axis=-1), "PNG")
    np.testing.assert_array_equal(preprocess(data, DEFAULT), preprocess(frame, DEFAULT))


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_png_uses_the_palette_colours(transparent: bool) -> None:
    paletted = Image.fromarray(synthetic(640, 480)).quantize(64)
    params = {"transparency": 0} if transparent else {}
    data = encode(paletted, "PNG", **params)
    colours = np.asarray(paletted.convert("RGB"))
    out = preprocess(data, DEFAULT)
    np.testing.assert_array_equal(out, preprocess(colours, DEFAULT))


def test_grayscale_jpeg_and_png() -> None:
    gray = synthetic(1920, 1080)[:, :, 0].copy()
    png = preprocess(encode(gray, "PNG"), DEFAULT)
    np.testing.assert_array_equal(png, preprocess(gray, DEFAULT))
    data = encode(gray)
    jpeg = preprocess(data, DEFAULT)
    assert_output(jpeg)
    assert (jpeg[:, :, 0] == jpeg[:, :, 1]).all()
    assert (jpeg[:, :, 0] == jpeg[:, :, 2]).all()
    assert mean_abs_diff(jpeg, reference(decode_full(data), DEFAULT)) <= MAX_MEAN_ABS_DIFF


def test_sixteen_bit_png_keeps_the_top_eight_bits() -> None:
    wide = synthetic(640, 480)[:, :, 0].astype(np.uint16) * 257  # 0..65535
    data = encode(Image.fromarray(wide), "PNG")
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode.startswith("I;16")
    expected = preprocess((wide >> 8).astype(np.uint8), DEFAULT)
    np.testing.assert_array_equal(preprocess(data, DEFAULT), expected)


def test_cmyk_jpeg_matches_reference() -> None:
    cmyk = Image.fromarray(synthetic(1920, 1080)).convert("CMYK")
    data = encode(cmyk)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "CMYK"
    out = preprocess(data, DEFAULT)
    assert mean_abs_diff(out, reference(decode_full(data), DEFAULT)) <= MAX_MEAN_ABS_DIFF


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "I;16"])
def test_pil_image_of_any_mode(mode: str) -> None:
    base = Image.fromarray(synthetic(640, 480))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) << 8)
        expected_rgb = base.convert("L").convert("RGB")
    else:
        image = base.convert(mode)
        expected_rgb = image.convert("RGBA" if mode in ("P", "PA") else "RGB").convert("RGB")
    out = preprocess(image, DEFAULT)
    assert_output(out)
    np.testing.assert_array_equal(out, preprocess(np.asarray(expected_rgb), DEFAULT))


# --- EXIF orientation -----------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize(
    "spec",
    [DEFAULT, PreprocessSpec(input_height=160, input_width=320, resize_policy="stretch")],
    ids=["crop", "stretch-160x320"],
)
def test_exif_orientation_is_applied(orientation: int, spec: PreprocessSpec) -> None:
    # 1283 x 721: not a multiple of the 8-pixel draft blocks, so the drafted image's last
    # column and row are partial and a flip that ignored that would be off.
    frame = synthetic(1283, 721, seed=3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(frame, exif=exif.tobytes())
    upright = decode_full(data)
    if orientation in (5, 6, 7, 8):
        assert upright.shape[:2] == (1283, 721)
    out = preprocess(data, spec)
    assert_output(out, spec)
    assert mean_abs_diff(out, reference(upright, spec)) <= MAX_MEAN_ABS_DIFF
    if orientation != 1:
        # The test can fail: ignoring the tag would be far off.
        with Image.open(io.BytesIO(data)) as stored:
            as_stored = np.asarray(stored.convert("RGB"))
        assert mean_abs_diff(reference(as_stored, spec), reference(upright, spec)) > 10


def test_exif_orientation_of_a_pil_image_is_left_alone() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(synthetic(640, 480), "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        expected = preprocess(np.asarray(opened), DEFAULT)
        np.testing.assert_array_equal(preprocess(opened, DEFAULT), expected)
    # ...while the same PNG as bytes is turned upright.
    assert mean_abs_diff(preprocess(data, DEFAULT), expected) > 10


# --- already the right size -----------------------------------------------------------------


def test_frame_at_the_input_size_is_returned_as_is() -> None:
    frame = np.ascontiguousarray(synthetic(224, 224))
    stretch = PreprocessSpec(resize_policy="stretch")
    assert preprocess(frame, stretch) is frame
    no_margin = PreprocessSpec(resize_size=224)
    assert preprocess(frame, no_margin) is frame


_AT_SIZE = synthetic(224, 224)


@pytest.mark.parametrize(
    ("source", "channel_order"),
    [
        (_AT_SIZE[:, :, ::-1], "BGR"),
        (np.pad(_AT_SIZE, ((0, 0), (0, 0), (0, 1))), "RGB"),
        (np.pad(_AT_SIZE, ((0, 0), (5, 5), (0, 0)))[:, 5:-5], "RGB"),
        (Image.fromarray(_AT_SIZE), "RGB"),
        (encode(_AT_SIZE, "PNG"), "RGB"),
    ],
    ids=["bgr-view", "rgba", "rgb-view", "pil", "png"],
)
def test_input_size_in_other_layouts_keeps_its_pixels(
    source: ImageInput, channel_order: ChannelOrder
) -> None:
    stretch = PreprocessSpec(resize_policy="stretch")
    out = preprocess(source, stretch, channel_order=channel_order)
    assert_output(out, stretch)
    np.testing.assert_array_equal(out, _AT_SIZE)


def test_shorter_side_at_resize_size_is_only_cropped() -> None:
    frame = synthetic(341, 256)
    left = round((341 - 224) / 2)
    expected = frame[16:240, left : left + 224]
    np.testing.assert_array_equal(preprocess(frame, DEFAULT), expected)
    np.testing.assert_array_equal(preprocess(encode(frame, "PNG"), DEFAULT), expected)


def test_frame_at_input_size_is_still_resized_by_the_crop_policy() -> None:
    # 224 x 224 under "resize to 256, crop 224" is enlarged and cropped, as the reference is;
    # only a resize that changes nothing is skipped.
    frame = synthetic(224, 224)
    out = preprocess(frame, DEFAULT)
    assert mean_abs_diff(out, reference(frame, DEFAULT)) <= MAX_MEAN_ABS_DIFF
    assert mean_abs_diff(out, frame) > 1


@pytest.mark.parametrize("as_bytes", [False, True])
def test_resampled_output_is_a_new_writable_array(as_bytes: bool) -> None:
    frame = np.ascontiguousarray(synthetic(640, 480))
    out = preprocess(encode(frame) if as_bytes else frame, DEFAULT)
    assert out.flags.writeable
    assert not np.shares_memory(out, frame)


# --- errors ---------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-photo.jpg"
    with pytest.raises(InvalidImageError, match=r"not found: '.*/no-such-photo\.jpg'") as info:
        preprocess(path, DEFAULT)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert isinstance(info.value, ValueError)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="cannot read image file") as info:
        preprocess(tmp_path, DEFAULT)
    assert isinstance(info.value.__cause__, OSError)


def test_text_file_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a picture\n")
    with pytest.raises(
        InvalidImageError, match=r"cannot decode image file '.*notes\.txt': not an image"
    ):
        preprocess(path, DEFAULT)


@pytest.mark.parametrize("data", [b"", b"GIF89a nonsense", bytes(range(256)) * 4])
def test_garbage_bytes_are_not_an_image(data: bytes) -> None:
    with pytest.raises(InvalidImageError, match="cannot decode image bytes") as info:
        preprocess(data, DEFAULT)
    assert info.value.__cause__ is not None


def test_truncated_jpeg_is_reported() -> None:
    data = encode(synthetic(640, 480))
    for cut in (bytearray(data[: len(data) // 2]), memoryview(data)[:1000]):
        with pytest.raises(InvalidImageError, match="cannot decode image bytes") as info:
            preprocess(cut, DEFAULT)
        assert isinstance(info.value.__cause__, OSError)


def test_decompression_bomb_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InvalidImageError, match="cannot decode") as info:
        preprocess(encode(synthetic(150, 100), "PNG"), DEFAULT)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int8, np.bool_])
def test_wrong_dtype_says_uint8_is_needed(dtype: type[np.generic]) -> None:
    frame = np.zeros((480, 640, 3), dtype=dtype)
    with pytest.raises(InvalidImageError, match=f"dtype {np.dtype(dtype)}.*uint8"):
        preprocess(frame, DEFAULT)


@pytest.mark.parametrize("shape", [(640,), (480, 640, 2), (480, 640, 5), (2, 480, 640, 3)])
def test_wrong_shape_gives_the_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidImageError, match=re.escape(f"shape {shape}")):
        preprocess(np.zeros(shape, dtype=np.uint8), DEFAULT)


@pytest.mark.parametrize("shape", [(0, 640, 3), (480, 0), (0, 0, 4)])
def test_empty_frame_is_reported(shape: tuple[int, ...]) -> None:
    with pytest.raises(InvalidImageError, match="empty"):
        preprocess(np.zeros(shape, dtype=np.uint8), DEFAULT)


def test_empty_pil_image_is_reported() -> None:
    with pytest.raises(InvalidImageError, match="empty: 0x5 pixels"):
        preprocess(Image.new("RGB", (0, 5)), DEFAULT)


@pytest.mark.parametrize("value", [None, 42, [b"\xff\xd8"]])
def test_other_types_are_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match="expected an image"):
        preprocess(value, DEFAULT)  # type: ignore[arg-type]


def test_unknown_channel_order_is_rejected() -> None:
    with pytest.raises(ValueError, match="channel_order"):
        preprocess(synthetic(64, 64), DEFAULT, channel_order="RGBA")  # type: ignore[arg-type]


# --- is_image_input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "cat.jpg",
        Path("cat.jpg"),
        b"\xff\xd8",
        bytearray(b"\xff\xd8"),
        memoryview(b"\xff\xd8"),
        Image.new("RGB", (4, 4)),
        np.zeros((4, 4), dtype=np.uint8),
        np.zeros((4, 4, 3), dtype=np.uint8),
    ],
    ids=["str", "path", "bytes", "bytearray", "memoryview", "pil", "gray", "rgb"],
)
def test_single_images_are_image_inputs(value: object) -> None:
    assert is_image_input(value)


@pytest.mark.parametrize(
    "value",
    [[], ["cat.jpg"], ("a.jpg", "b.jpg"), [np.zeros((4, 4, 3), np.uint8)], np.zeros((2, 4, 4, 3))],
    ids=["empty-list", "list", "tuple", "list-of-arrays", "4d-stack"],
)
def test_sequences_are_not_image_inputs(value: object) -> None:
    assert not is_image_input(value)
