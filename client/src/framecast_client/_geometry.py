"""Where in the source image the output comes from: the crop box, in source pixels.

For :mod:`framecast_client.preprocess`: the box the resize policy takes (as torchvision's
resize-then-crop would), the image's EXIF orientation and the box mapped to the stored pixel
grid under it, and the part of the image a resampling filter reads around the box.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeAlias

from PIL import Image

if TYPE_CHECKING:
    from .preprocess import PreprocessSpec

Box: TypeAlias = tuple[float, float, float, float]

# Half-width of each filter's kernel in source pixels at scale 1 (Pillow's own values).
FILTER_SUPPORT: dict[str, float] = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0}

# EXIF orientation tag value -> the transpose that shows the image upright, as
# PIL.ImageOps.exif_transpose applies it.
ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112

# EXIF orientations that turn the image by 90 degrees: width and height swap for display.
_TURNED = (5, 6, 7, 8)


def stored_box(
    width: int, height: int, spec: PreprocessSpec, orientation: int
) -> tuple[Box, int, int]:
    """The box of a stored ``width x height`` image displayed turned by EXIF ``orientation``,
    and the output size in the stored orientation."""
    upright = (height, width) if orientation in _TURNED else (width, height)
    box = to_raw_orientation(plan(*upright, spec), width, height, orientation)
    return (box, *raw_output_size(spec, orientation))


def plan(width: int, height: int, spec: PreprocessSpec) -> Box:
    """The region of a ``width x height`` source that becomes the output, in source pixels.

    For the crop policy the integer resized size and crop offsets are torchvision's
    (``Resize(int)`` then ``CenterCrop``), so the box samples exactly the pixel centres that
    resize-then-crop would: the result is the same image, computed from the crop alone.
    """
    if spec.resize_policy == "stretch":
        return (0.0, 0.0, float(width), float(height))
    if width <= height:
        resized_w = spec.resize_size
        resized_h = spec.resize_size * height // width
    else:
        resized_h = spec.resize_size
        resized_w = spec.resize_size * width // height
    # round() is Python's half-to-even, like torchvision's center_crop.
    left = round((resized_w - spec.input_width) / 2)
    top = round((resized_h - spec.input_height) / 2)
    scale_x = width / resized_w
    scale_y = height / resized_h
    return (
        left * scale_x,
        top * scale_y,
        (left + spec.input_width) * scale_x,
        (top + spec.input_height) * scale_y,
    )


def integer_identity_box(box: Box, out_w: int, out_h: int) -> tuple[int, int] | None:
    """The (left, top) of a box that maps source pixels one to one onto the output, else None."""
    left, top, right, bottom = box
    if right - left == out_w and bottom - top == out_h and left.is_integer() and top.is_integer():
        return int(left), int(top)
    return None


def support_margin(box: Box, out_w: int, out_h: int, interpolation: str) -> tuple[int, int]:
    """How far outside ``box`` the resampling filter reads, in whole source pixels.

    Pillow widens the kernel by the scale when shrinking but never narrows it when enlarging;
    one pixel more covers its rounding of the kernel bounds and the blocks of ``reduce``.
    """
    support = FILTER_SUPPORT[interpolation]
    scale_x = max((box[2] - box[0]) / out_w, 1.0)
    scale_y = max((box[3] - box[1]) / out_h, 1.0)
    return math.ceil(support * scale_x) + 1, math.ceil(support * scale_y) + 1


def to_raw_orientation(box: Box, width: int, height: int, orientation: int) -> Box:
    """Map a box given in upright (displayed) coordinates to the stored pixel grid.

    ``width x height`` is the stored size. The image is displayed as
    ``ORIENTATION_TRANSPOSE[orientation]`` of the stored pixels; this is that transpose's
    inverse, applied to the box's corners.
    """
    x0, y0, x1, y1 = box
    if orientation == 2:  # mirrored left-right
        return (width - x1, y0, width - x0, y1)
    if orientation == 3:  # rotated 180
        return (width - x1, height - y1, width - x0, height - y0)
    if orientation == 4:  # mirrored top-bottom
        return (x0, height - y1, x1, height - y0)
    if orientation == 5:  # transposed: displayed (X, Y) is stored (Y, X)
        return (y0, x0, y1, x1)
    if orientation == 6:  # stored image rotated 90 clockwise for display: stored = (Y, H - X)
        return (y0, height - x1, y1, height - x0)
    if orientation == 7:  # transversed: stored = (W - Y, H - X)
        return (width - y1, height - x1, width - y0, height - x0)
    if orientation == 8:  # stored image rotated 90 anticlockwise for display: stored = (W - Y, X)
        return (width - y1, x0, width - y0, x1)
    return box


def read_region(
    box: Box, width: int, height: int, out_w: int, out_h: int, interpolation: str
) -> tuple[tuple[int, int, int, int], Box]:
    """The part of a ``width x height`` image that resampling ``box`` reads, and the box in it.

    Numpy frames and Pillow images both go through this, so that a frame, the same frame as a
    Pillow image and the same frame as a PNG give bit-identical results: resampling a box
    shifted by whole pixels changes float rounding, and with it a pixel here and there by one.
    """
    margin_x, margin_y = support_margin(box, out_w, out_h, interpolation)
    x0 = max(0, math.floor(box[0]) - margin_x)
    y0 = max(0, math.floor(box[1]) - margin_y)
    x1 = min(width, math.ceil(box[2]) + margin_x)
    y1 = min(height, math.ceil(box[3]) + margin_y)
    return (x0, y0, x1, y1), (box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)


def raw_output_size(spec: PreprocessSpec, orientation: int) -> tuple[int, int]:
    """The output size in the stored orientation: swapped when EXIF turns the image 90."""
    if orientation in _TURNED:
        return spec.input_height, spec.input_width
    return spec.input_width, spec.input_height


def exif_orientation(pil: Image.Image) -> int:
    """The EXIF orientation (1-8) of a freshly opened image; 1 when absent or invalid."""
    try:
        value = pil.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:
        # A broken EXIF block (Pillow raises a variety of errors for those) must not make the
        # pixels unusable: show them as stored.
        return 1
    return value if isinstance(value, int) and value in ORIENTATION_TRANSPOSE else 1
