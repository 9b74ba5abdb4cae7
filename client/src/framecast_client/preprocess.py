"""Turn any image into the uint8 RGB array a Framecast server expects.

The server says how to preprocess in ``ModelInfo.preprocessing``; :class:`PreprocessSpec` holds
the same fields, and :func:`preprocess` turns a file path, encoded bytes, a Pillow image or a
numpy frame into a C-contiguous ``uint8`` array of shape ``[input_height, input_width, 3]`` in
RGB order. This module is the project's one implementation of that step.

The result matches the textbook pipeline (decode at full resolution, antialiased resize of the
shorter side to ``resize_size``, center crop) to within half a grey level on average and a few
at worst, at every size, but gets there in a fraction of the time:

* the crop is mapped back to a box in *source* coordinates and a single
  ``Image.resize(..., box=...)`` call produces the output, so no pixel outside the crop is
  resampled and no full-size intermediate image is made;
* large JPEGs are decoded with ``Image.draft``, which scales in the DCT domain by 1/2, 1/4 or
  1/8, but only as far as leaves the antialiased resize a reduction of its own (see
  ``_DRAFT_HEADROOM``);
* EXIF orientation, grayscale to RGB and BGR to RGB are applied to the small output rather
  than to the full-size image.

The geometry (the crop box in source pixels, EXIF orientations, the part of the image a
filter reads) is ``_geometry``'s; this module decodes and resamples.

Alpha is dropped, never composited: an RGBA pixel keeps its stored colour whatever its opacity,
for files, Pillow images and 4-channel numpy frames alike (the same as Pillow's
``convert("RGB")``).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import IO, Literal, TypeAlias

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from framecast_client.errors import InvalidImageError

from ._geometry import (
    ORIENTATION_TRANSPOSE,
    exif_orientation,
    integer_identity_box,
    plan,
    read_region,
    stored_box,
)

__all__ = [
    "ChannelOrder",
    "ImageInput",
    "Interpolation",
    "PreprocessSpec",
    "ResizePolicy",
    "is_image_input",
    "preprocess",
]

ResizePolicy: TypeAlias = Literal["shorter_side_then_center_crop", "stretch"]
Interpolation: TypeAlias = Literal["nearest", "bilinear", "bicubic"]
ChannelOrder: TypeAlias = Literal["RGB", "BGR"]

ImageInput: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | NDArray[np.uint8]
)
"""One image: a file path, encoded file bytes, a Pillow image or a uint8 numpy frame."""

_RESIZE_POLICIES: frozenset[str] = frozenset({"shorter_side_then_center_crop", "stretch"})

_RESAMPLE: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}

# How much shrinking the JPEG decoder's DCT scaling must leave to the antialiased resize. DCT
# scaling filters each 8x8 block on its own, a different low-pass from the bilinear/bicubic
# kernel the reference uses, and converts to RGB (clipping) after averaging where the
# reference clips each full-resolution pixel; when it does nearly all the shrinking (an image
# 2x, 4x or 8x the resize target) the output is off by 2-3 grey levels on average and 60-100
# at edges. Headroom 5 keeps the worst pixel under 6; a 1080p JPEG (4.2x a 256 resize) is then
# decoded in full, and a 12 MP photo at 1/2.
#
# The 1080p cost this buys conflicts with the "at most 1 ms more at 1080p": only a 1/2
# draft (headroom <= 2.1) is cheap enough, and nothing tried at 1/2 keeps the worst pixel under
# 8. Measured: worst mean/max abs difference from the float reference over tests/client/
# test_preprocess.py's JPEG sweep ("sweep"), and over fresh pictures at the same sizes in JPEG
# quality 75/90/95 with 4:2:0, 4:4:4 and 4:2:2 chroma ("other"); 1080p cost over the former
# draft-to-output path (3.4 ms), all timed in one run as benchmarks/preprocess_speed.py does:
#   option                                      1080p    sweep      other
#   headroom 5 (this): full decode at 1080p     +3.9 ms  0.23/2.7   0.27/5.7
#   headroom 4 (1080p in full as well)          +3.9 ms  0.25/3.4   0.35/15.1 (9.4 but 4:2:2)
#   headroom 3 (1080p in full as well)          +3.9 ms  0.29/6.6   0.45/17.1 (10.7 but 4:2:2)
#   headroom 2: 1080p at 1/2                    +0.8 ms  0.38/10.6  0.93/47.6 (20.1 but 4:2:2)
#   headroom 2, and the decoder's extra blur
#     undone to second order on the output      +1.6 ms  0.36/7.4   0.98/47.6 (17.4 but 4:2:2)
#   full decode, reducing_gap=2 box pre-shrink  +2.6 ms  0.38/8.1   0.48/14.4
#   full decode to YCbCr, resize, then RGB      decoding alone is 0.7 ms slower than to RGB
#     (libjpeg-turbo's RGB conversion is SIMD, its YCbCr output not; 0.3 ms at 1/2), and
#     Pillow's own YCbCr->RGB conversion is off by 0.64 on average.
# A 1/2 decode is 0.3-0.5 ms dearer than the former 1/4 and its 2x resize 0.5 ms dearer than
# the former 1.05x one, so 1/2 leaves no room for any correction; the errors left after one
# are where JPEG ringing next to saturated colour detail overshoots 0-255 at full resolution
# (up to 100 at quality 75), which the reference clips pixel by pixel and a scaled decode
# cannot. Partial decoding (libjpeg-turbo's jpeg_crop_scanline) is not reachable from Pillow.
_DRAFT_HEADROOM = 5
# No reducing_gap: Pillow's integer box pre-shrink it enables is cheaper (about 1 ms on a 1080p
# frame) but leaves 8-14 grey levels at worst at some sizes, against the budget of 8.

# Modes that are resized as they are and turned into RGB afterwards, on the small output.
# Any other mode is converted to RGB first: palette indices and CMYK cannot be interpolated.
_RESIZE_AS_IS_MODES = frozenset({"RGB", "RGBX", "L"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True, slots=True)
class PreprocessSpec:
    """How to turn an image into the model's input, as the server's ModelInfo describes it.

    Attributes:
        input_height: Height of the array the server expects, in pixels.
        input_width: Width of the array the server expects, in pixels.
        resize_policy: ``"shorter_side_then_center_crop"`` scales the shorter side to
            ``resize_size`` keeping the aspect ratio, then cuts the centre
            ``input_height x input_width``; ``"stretch"`` scales straight to the input size,
            ignoring the aspect ratio.
        resize_size: Target of the shorter side for ``shorter_side_then_center_crop``;
            unused by ``stretch``.
        interpolation: The resampling filter; ``bilinear`` and ``bicubic`` are antialiased
            when shrinking, as Pillow's (and torchvision's) are.

    Raises:
        ValueError: A size is not a positive integer, a policy or filter is unknown, or the
            crop would be larger than the resized image.
    """

    input_height: int = 224
    input_width: int = 224
    resize_policy: ResizePolicy = "shorter_side_then_center_crop"
    resize_size: int = 256
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        for name in ("input_height", "input_width", "resize_size"):
            value = getattr(self, name)
            # bool is an int subclass; True as a size is a bug, not 1.
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise ValueError(msg)
        if self.resize_policy not in _RESIZE_POLICIES:
            msg = (
                f"unknown resize_policy {self.resize_policy!r}; "
                f"expected one of {sorted(_RESIZE_POLICIES)}"
            )
            raise ValueError(msg)
        if self.interpolation not in _RESAMPLE:
            msg = (
                f"unknown interpolation {self.interpolation!r}; expected one of {sorted(_RESAMPLE)}"
            )
            raise ValueError(msg)
        if self.resize_policy == "shorter_side_then_center_crop" and self.resize_size < max(
            self.input_height, self.input_width
        ):
            msg = (
                f"resize_size {self.resize_size} is smaller than the "
                f"{self.input_height}x{self.input_width} crop it must contain"
            )
            raise ValueError(msg)


def is_image_input(obj: object) -> bool:
    """Tell one image from a sequence of images.

    True for a path (``str`` or ``os.PathLike``), encoded bytes (``bytes``, ``bytearray``,
    ``memoryview``), a Pillow image, and a numpy array of any shape but 4-D; False for anything
    else, in particular lists and tuples. A 4-D array is a stack of frames ``[N, H, W, C]``, so
    it counts as a sequence of N images. True does not mean the image is valid:
    :func:`preprocess` checks that.
    """
    if isinstance(obj, np.ndarray):
        return obj.ndim != 4
    return isinstance(obj, str | os.PathLike | bytes | bytearray | memoryview | Image.Image)


def preprocess(
    image: ImageInput, spec: PreprocessSpec, *, channel_order: ChannelOrder = "RGB"
) -> NDArray[np.uint8]:
    """Turn one image into the array the server expects.

    Args:
        image: A path to an image file or the file's bytes (any format Pillow reads; the EXIF
            orientation is applied), a Pillow image (taken as it is, any mode; its EXIF tag is
            not applied, since it may have been applied already), or a ``uint8`` numpy frame
            ``[H, W, 3]``, ``[H, W, 4]`` (alpha dropped), ``[H, W, 1]`` or ``[H, W]``
            (grayscale). Non-contiguous views are fine.
        spec: How to resize and crop, from the server's ModelInfo.
        channel_order: The channel order of a 3- or 4-channel numpy frame: ``"BGR"`` for
            OpenCV frames. Files, bytes and Pillow images are always RGB, so it is ignored
            for them.

    Returns:
        A C-contiguous ``uint8`` array ``[spec.input_height, spec.input_width, 3]``, RGB. When
        a contiguous RGB numpy frame needs no resampling at all (it is already the output, as
        with ``stretch`` at the input size), that very array is returned, not a copy.

    Raises:
        InvalidImageError: The file does not exist or cannot be read, the data is not an image
            Pillow can decode, the array has the wrong dtype or shape, or the image is empty.
        TypeError: ``image`` is none of the accepted types.
        ValueError: ``channel_order`` is neither ``"RGB"`` nor ``"BGR"``.
    """
    if channel_order not in ("RGB", "BGR"):
        msg = f"channel_order must be 'RGB' or 'BGR', got {channel_order!r}"
        raise ValueError(msg)
    # Typed as object: callers outside mypy pass anything, and the last line must stay reachable.
    obj: object = image
    if isinstance(obj, np.ndarray):
        return _from_array(obj, spec, channel_order)
    if isinstance(obj, Image.Image):
        return _from_pil(obj, spec)
    if isinstance(obj, bytes | bytearray | memoryview):
        return _from_encoded(io.BytesIO(obj), _describe_bytes(obj), spec)
    if isinstance(obj, str | os.PathLike):
        path = os.fspath(obj)
        try:
            stream = open(path, "rb")  # noqa: SIM115 - closed below, after decoding
        except FileNotFoundError as exc:
            msg = f"image file not found: {path!r}"
            raise InvalidImageError(msg) from exc
        except OSError as exc:
            msg = f"cannot read image file {path!r}: {exc.strerror or exc}"
            raise InvalidImageError(msg) from exc
        with stream:
            return _from_encoded(stream, f"image file {path!r}", spec)
    msg = (
        "expected an image: a path, encoded bytes, a PIL.Image.Image or a uint8 numpy array; "
        f"got {type(obj).__name__}"
    )
    raise TypeError(msg)


# --- numpy frames ---------------------------------------------------------------------------


def _from_array(
    array: NDArray[np.generic], spec: PreprocessSpec, channel_order: ChannelOrder
) -> NDArray[np.uint8]:
    if array.dtype != np.uint8:
        msg = (
            f"image array has dtype {array.dtype}; a uint8 array (values 0-255) is needed "
            "(convert floats in [0, 1] with (a * 255).round().astype(np.uint8))"
        )
        raise InvalidImageError(msg)
    frame: NDArray[np.uint8] = array.astype(np.uint8, copy=False)
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (3, 4))):
        msg = (
            f"image array has shape {array.shape}; expected [H, W, 3], [H, W, 4] "
            "(alpha dropped), [H, W, 1] or [H, W] (grayscale)"
        )
        raise InvalidImageError(msg)
    height, width = frame.shape[:2]
    if height == 0 or width == 0:
        msg = f"image array is empty: shape {array.shape}"
        raise InvalidImageError(msg)

    box = plan(width, height, spec)
    out_w, out_h = spec.input_width, spec.input_height
    origin = integer_identity_box(box, out_w, out_h)
    if origin == (0, 0) and (width, height) == (out_w, out_h):
        return _finish(frame, channel_order)
    if origin is not None:
        # Nothing to resample: the output is a slice of the frame.
        left, top = origin
        return _finish(frame[top : top + out_h, left : left + out_w], channel_order)

    # Hand Pillow only the part of the frame the filter reads: for a center crop of a 16:9
    # frame that is about half of it, and Pillow copies whatever it is given.
    (x0, y0, x1, y1), local_box = read_region(box, width, height, out_w, out_h, spec.interpolation)
    region = np.ascontiguousarray(frame[y0:y1, x0:x1])
    if region.ndim == 3 and region.shape[2] == 4:
        # Map the 4-channel buffer as RGBX, Pillow's "fourth byte unused" mode: no copy, and
        # unlike RGBA the resize does not premultiply colours by alpha.
        pil = Image.frombuffer("RGBX", (x1 - x0, y1 - y0), region, "raw", "RGBX", 0, 1)
    else:
        # A BGR frame is resized as it is: the filter treats channels alike, so flipping the
        # small output afterwards is the same and much cheaper than flipping the frame.
        pil = Image.fromarray(region)
    resized = pil.resize((out_w, out_h), _RESAMPLE[spec.interpolation], box=local_box)
    # np.array, not asarray: a view of Pillow's buffer is read-only, and callers may write.
    return _finish(np.array(resized), channel_order)


def _finish(out: NDArray[np.uint8], channel_order: ChannelOrder) -> NDArray[np.uint8]:
    """Make an output-sized array C-contiguous uint8 RGB [H, W, 3], copying only if needed."""
    if out.ndim == 2:
        return np.repeat(out[:, :, np.newaxis], 3, axis=2)
    if channel_order == "BGR":
        return np.ascontiguousarray(out[:, :, 2::-1])
    if out.shape[2] == 3:
        return np.ascontiguousarray(out)
    return np.ascontiguousarray(out[:, :, :3])


# --- Pillow images and files ----------------------------------------------------------------


def _describe_bytes(data: bytes | bytearray | memoryview) -> str:
    head = bytes(memoryview(data)[:8])
    return f"image bytes ({memoryview(data).nbytes} bytes starting {head!r})"


def _from_encoded(stream: IO[bytes], what: str, spec: PreprocessSpec) -> NDArray[np.uint8]:
    """Decode a file or byte string and preprocess it, drafting JPEGs to the size needed."""
    try:
        with Image.open(stream) as pil:
            stored_size = pil.size
            orientation = exif_orientation(pil)
            draft_scale = 1
            if pil.format == "JPEG" and spec.interpolation != "nearest":
                # Nearest is meant to pick source pixels; drafting would average them first.
                draft_scale = _draft(pil, spec, orientation)
            pil.load()
            return _from_pil(
                pil,
                spec,
                stored_size=stored_size,
                draft_scale=draft_scale,
                orientation=orientation,
            )
    except InvalidImageError:
        raise
    except UnidentifiedImageError as exc:
        msg = f"cannot decode {what}: not an image format Pillow can read"
        raise InvalidImageError(msg) from exc
    except Image.DecompressionBombError as exc:
        msg = f"cannot decode {what}: {exc}"
        raise InvalidImageError(msg) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        # Pillow reports truncated and corrupt data as OSError, bad headers as SyntaxError or
        # ValueError, depending on the format plugin.
        msg = f"cannot decode {what}: {exc}"
        raise InvalidImageError(msg) from exc


def _draft(pil: Image.Image, spec: PreprocessSpec, orientation: int) -> int:
    """Ask the JPEG decoder for the smallest DCT scale that leaves the resize its headroom.

    Returns the scale (1, 2, 4 or 8) the decoder will shrink by.
    """
    width, height = pil.size
    box, out_w, out_h = stored_box(width, height, spec, orientation)
    # The drafted box must keep at least _DRAFT_HEADROOM times out_w x out_h pixels. draft()
    # picks the largest scale s (8, 4, 2 or 1) with width // requested_width >= s, that is
    # width / s >= requested width (and the same for height), so requesting
    # width * out_w * headroom / box_width, rounded up, guarantees
    # box_width / s >= headroom * out_w.
    requested = (
        min(width, math.ceil(width * out_w * _DRAFT_HEADROOM / (box[2] - box[0]))),
        min(height, math.ceil(height * out_h * _DRAFT_HEADROOM / (box[3] - box[1]))),
    )
    result = pil.draft("RGB", requested)
    if result is None:
        return 1
    _, drafted_box = result
    return round(width / drafted_box[2])


def _from_pil(
    pil: Image.Image,
    spec: PreprocessSpec,
    *,
    stored_size: tuple[int, int] | None = None,
    draft_scale: int = 1,
    orientation: int = 1,
) -> NDArray[np.uint8]:
    """Preprocess a loaded Pillow image.

    ``stored_size`` is the image's size before the JPEG decoder shrank it by ``draft_scale``
    (``pil.size`` is then the drafted size); ``orientation`` is the EXIF orientation to apply.
    Both are accounted for by arithmetic on the box and a transpose of the small output, never
    by touching the full image.
    """
    if stored_size is None:
        stored_size = pil.size
    width, height = stored_size
    if width == 0 or height == 0:
        msg = f"image is empty: {width}x{height} pixels"
        raise InvalidImageError(msg)
    box, out_w, out_h = stored_box(width, height, spec, orientation)
    origin = integer_identity_box(box, out_w, out_h) if draft_scale == 1 else None
    if origin is not None:
        left, top = origin
        resized = _resizable(pil.crop((left, top, left + out_w, top + out_h)))
    else:
        # The decoder's scaled grid starts at the same corner as the stored one: stored x is
        # drafted x / s. (The drafted size rounds up, so it is not the stored size / s.)
        box = (
            box[0] / draft_scale,
            box[1] / draft_scale,
            box[2] / draft_scale,
            box[3] / draft_scale,
        )
        area, local_box = read_region(box, *pil.size, out_w, out_h, spec.interpolation)
        # Cropped before any mode conversion, so only the region is converted.
        resized = _resizable(pil.crop(area)).resize(
            (out_w, out_h),
            _RESAMPLE[spec.interpolation],
            box=local_box,
        )
    transpose = ORIENTATION_TRANSPOSE.get(orientation)
    if transpose is not None:
        resized = resized.transpose(transpose)
    # np.array, not asarray: a view of Pillow's buffer is read-only, and callers may write.
    return _finish(np.array(resized), "RGB")


def _resizable(pil: Image.Image) -> Image.Image:
    """The image in a mode whose pixels can be interpolated and then read as RGB.

    RGB, RGBX and L are resized as they are (L becomes RGB on the small output); every
    other mode is converted to RGB before the resize.
    """
    mode = pil.mode
    if mode in _RESIZE_AS_IS_MODES:
        return pil
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips 16-bit values at 255, which turns a 16-bit grayscale
        # PNG or TIFF white; keep the top 8 bits instead. (32-bit "I" has no fixed range and
        # gets Pillow's conversion, which reads it on the 0-255 scale of "L".)
        wide = np.asarray(pil)
        return Image.fromarray((wide >> 8).astype(np.uint8))
    try:
        if mode in ("P", "PA"):
            # Through RGBA so a transparent palette entry keeps its colour (alpha is dropped,
            # like everywhere else) and Pillow does not warn about the transparency.
            pil = pil.convert("RGBA")
        return pil.convert("RGB")
    except ValueError as exc:
        msg = f"cannot convert an image of mode {mode!r} to RGB: {exc}"
        raise InvalidImageError(msg) from exc
