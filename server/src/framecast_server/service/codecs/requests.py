"""framecast.v1 requests as the server reads them: bytes -> validated numpy batches and options.

Images arrive raw (uint8 HWC bytes: viewed where they arrived, no copy) or compressed (JPEG or
PNG: decoded here, CPU work that callers on an event loop run on a thread). Every check says
what is wrong in terms a client can act on; client-supplied text is quoted short.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire_format import CHANNELS, ENCODING_FROM_PROTO, WireFormatError
from google.protobuf.message import DecodeError, Message
from numpy.typing import NDArray
from PIL import Image

# Client-supplied text quoted in an error message is cut to this many characters: an error
# must stay small whatever a client sends (gRPC carries it in a size-limited header).
MAX_QUOTED_CHARS = 64
#: What this server accepts, in ModelInfo.encodings.
SERVER_ENCODINGS: tuple[str, ...] = ("raw", "jpeg", "png")

M = TypeVar("M", bound=Message)


class PreprocessingMismatchError(Exception):
    """Images were prepared for preprocessing other than the served model's.

    Not a malformed message: the sender followed a ModelInfo that is no longer current (the
    server was restarted with a model that wants other preprocessing). Re-reading
    GetModelInfo and preparing the images again fixes it.
    """


def quote(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """Client-supplied ``text`` as an error message may show it: at most ``limit`` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def malformed(what: str, size: int, hint: str = "") -> WireFormatError:
    """The error for ``size`` bytes received that are not a valid ``what`` message."""
    return WireFormatError(f"the bytes received ({size}) are not a valid {what} message{hint}")


def decode(message_type: type[M], raw: bytes) -> M:
    """Parse ``raw`` as a ``message_type``; bytes that are not one raise WireFormatError."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        # Raised outside the handler: the parser's error (and its traceback) is not kept.
        pass
    descriptor = message_type.DESCRIPTOR
    hint = f"; send one built from {descriptor.file.name}"
    raise malformed(descriptor.full_name, len(raw), hint)


def is_encoded(image: pb.Image) -> bool:
    """Whether an image message carries compressed bytes that must be decoded (CPU work)."""
    return image.encoding != pb.IMAGE_ENCODING_RAW


def images_from_proto(
    images: Sequence[pb.Image], *, height: int, width: int, max_batch: int
) -> NDArray[np.uint8]:
    """Validate the images of a request and stack them into one uint8 [N, H, W, 3] batch."""
    _check_count(len(images), max_batch)
    if len(images) == 1:  # the common case: a view of the received bytes, no copy
        return image_from_proto(images[0], height=height, width=width)[None]
    batch = np.empty((len(images), height, width, CHANNELS), dtype=np.uint8)
    for i, image in enumerate(images):
        batch[i] = image_from_proto(image, height=height, width=width, position=i)
    return batch


def _check_count(count: int, max_batch: int) -> None:
    if not count:
        raise WireFormatError("the request holds no images; send at least one")
    if count > max_batch:
        raise WireFormatError(
            f"the request holds {count} images, more than this server's max batch of "
            f"{max_batch}; split it into several requests"
        )


def _check_header(
    channels: int, image_height: int, image_width: int, *, height: int, width: int, position: int
) -> None:
    if channels != CHANNELS:
        raise WireFormatError(
            f"image {position} has {channels} channels; this model takes {CHANNELS} (RGB)"
        )
    if (image_height, image_width) != (height, width):
        raise WireFormatError(
            f"image {position} is {image_height}x{image_width} (HxW); this model takes "
            f"{height}x{width}: preprocess it as GetModelInfo's preprocessing says"
        )


def _check_raw_size(size: int, *, height: int, width: int, position: int) -> None:
    expected = height * width * CHANNELS
    if size != expected:
        raise WireFormatError(
            f"image {position} carries {size} bytes; {height}x{width}x{CHANNELS} uint8 "
            f"needs exactly {expected}"
        )


def image_from_proto(
    image: pb.Image, *, height: int, width: int, position: int = 0
) -> NDArray[np.uint8]:
    """Validate one image message and view its bytes as uint8 [H, W, 3].

    A raw image is a read-only view of the received bytes, no copy; a JPEG or PNG is decoded
    (CPU work: callers on an event loop run this on a thread when :func:`is_encoded`).
    """
    _check_header(
        image.channels, image.height, image.width, height=height, width=width, position=position
    )
    data = image.data  # each access of a bytes field makes a new copy: read it once
    if image.encoding != pb.IMAGE_ENCODING_RAW:
        return _decode(data, image.encoding, height=height, width=width, position=position)
    _check_raw_size(len(data), height=height, width=width, position=position)
    return np.frombuffer(data, dtype=np.uint8).reshape(height, width, CHANNELS)


# ---------------------------------------------------------------- the unary fast path
# A ClassifyRequest of raw images, read straight from its bytes: the images stay where they
# arrived (no parsed copy of each frame, no second copy when its bytes field is read). Only the
# plain shape of the message is read here: anything else (compressed images, unknown fields,
# oversized varints, bytes that are not a message at all) is left to the protobuf parser, so
# every message means exactly what protobuf says and every error reads the same.


class _NotPlainError(Exception):
    """The message is not one the fast reader handles; the protobuf parser takes it."""


# A raw image found in a request: (offset of its data, its length, height, width, channels).
_RawImage = tuple[int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class RawClassifyRequest:
    """A ClassifyRequest whose images are all raw, as :func:`read_classify_request` found it.

    ``images`` locate each image inside ``raw``; :meth:`batch` validates and views them.
    """

    raw: bytes
    images: list[_RawImage]
    top_k: int | None
    preprocessing_id: str

    def batch(self, *, height: int, width: int, max_batch: int) -> NDArray[np.uint8]:
        """As :func:`images_from_proto`: the validated uint8 [N, H, W, 3] batch, same errors.

        One image is a read-only view of the received bytes (no copy).
        """
        images = self.images
        _check_count(len(images), max_batch)
        views = []
        for position, (offset, size, image_height, image_width, channels) in enumerate(images):
            _check_header(
                channels, image_height, image_width, height=height, width=width, position=position
            )
            _check_raw_size(size, height=height, width=width, position=position)
            views.append(np.frombuffer(self.raw, np.uint8, size, offset))
        if len(views) == 1:
            return views[0].reshape(1, height, width, CHANNELS)
        batch = np.empty((len(views), height, width, CHANNELS), dtype=np.uint8)
        for i, view in enumerate(views):
            batch[i] = view.reshape(height, width, CHANNELS)
        return batch


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    """A varint of at most 32 bits at ``pos``: (value, the position after it)."""
    byte = raw[pos]
    if byte < 0x80:
        return byte, pos + 1
    value, shift = byte & 0x7F, 7
    while True:
        pos += 1
        byte = raw[pos]  # IndexError when truncated: not plain
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 32:
                raise _NotPlainError
            return value, pos + 1
        shift += 7
        if shift > 28:
            raise _NotPlainError


def _read_image(raw: bytes, pos: int, end: int) -> _RawImage:
    data_offset = data_size = height = width = channels = 0
    while pos < end:
        tag, pos = _varint(raw, pos)
        if tag == 0x0A:  # 1: data, bytes
            data_size, pos = _varint(raw, pos)
            data_offset = pos
            pos += data_size
        elif tag == 0x10:  # 2: height
            height, pos = _varint(raw, pos)
        elif tag == 0x18:  # 3: width
            width, pos = _varint(raw, pos)
        elif tag == 0x20:  # 4: channels
            channels, pos = _varint(raw, pos)
        elif tag == 0x28:  # 5: encoding
            encoding, pos = _varint(raw, pos)
            if encoding != pb.IMAGE_ENCODING_RAW:
                raise _NotPlainError  # compressed: decoded from the parsed message, off the loop
        else:
            raise _NotPlainError
    if pos != end:
        raise _NotPlainError
    return data_offset, data_size, height, width, channels


def read_classify_request(raw: bytes) -> RawClassifyRequest | None:
    """Read a ClassifyRequest of raw images from its bytes; None for any other message.

    None means "parse it with :func:`decode`": compressed images, fields this reader does not
    know, or bytes that are not a valid message (which :func:`decode` then refuses).
    """
    images: list[_RawImage] = []
    top_k: int | None = None
    preprocessing_id = ""
    pos, end = 0, len(raw)
    try:
        while pos < end:
            tag, pos = _varint(raw, pos)
            if tag == 0x0A:  # 1: images
                size, pos = _varint(raw, pos)
                if pos + size > end:
                    return None
                images.append(_read_image(raw, pos, pos + size))
                pos += size
            elif tag == 0x10:  # 2: top_k
                top_k, pos = _varint(raw, pos)
            elif tag == 0x1A:  # 3: preprocessing_id
                size, pos = _varint(raw, pos)
                if pos + size > end:
                    return None
                preprocessing_id = raw[pos : pos + size].decode()
                pos += size
            else:
                return None
    except (_NotPlainError, IndexError, UnicodeDecodeError):
        return None
    if pos != end:
        return None
    return RawClassifyRequest(raw, images, top_k, preprocessing_id)


def _decode(
    data: bytes, encoding: int, *, height: int, width: int, position: int
) -> NDArray[np.uint8]:
    name = ENCODING_FROM_PROTO.get(encoding)  # type: ignore[call-overload]
    if name is None:
        raise WireFormatError(
            f"image {position} has encoding {encoding}, which this server does not know; "
            f"it accepts {', '.join(SERVER_ENCODINGS)}"
        )
    expected_format = "JPEG" if name == "jpeg" else "PNG"
    try:
        with Image.open(io.BytesIO(data), formats=[expected_format]) as pil:
            if pil.size != (width, height):
                raise WireFormatError(
                    f"image {position} is a {name} of {pil.size[1]}x{pil.size[0]} (HxW); this "
                    f"model takes {height}x{width}"
                )
            rgb = pil.convert("RGB") if pil.mode != "RGB" else pil
            rgb.load()
            return np.asarray(rgb)
    except WireFormatError:
        raise
    except Exception as exc:  # Pillow reports bad data as OSError, SyntaxError, ValueError...
        raise WireFormatError(f"image {position} is not a valid {name}: {exc}") from exc


def top_k_from_proto(value: int | None, *, num_classes: int, default: int) -> int:
    """The top_k a request asks for: its default when unset, else 1..num_classes."""
    if value is None:
        return default
    if not 1 <= value <= num_classes:
        raise WireFormatError(f"top_k must be between 1 and {num_classes}, got {value}")
    return value


def check_preprocessing(stated: str, served: str) -> None:
    """Refuse images a request says were prepared for ``stated`` when the server wants ``served``.

    An empty ``stated`` is not checked: raw clients that do not state it keep working.
    """
    if stated and stated != served:
        raise PreprocessingMismatchError(
            f"the images were prepared for preprocessing {quote(stated)}, but this server's model "
            f"wants {served}: it was restarted with another model. Read GetModelInfo again "
            "and preprocess the images as it says"
        )
