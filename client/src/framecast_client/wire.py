"""The one place that knows the wire format: numpy and typed results <-> framecast.v1 messages.

Both ends use it: the client to build requests and read results, the server to read images
(validating them) and to describe its preprocessing.

Images travel in one of three encodings (:class:`Encoding`): raw uint8 HWC bytes (150,528
bytes for 224x224, no CPU), or the prepared image compressed as JPEG (lossy, about a tenth
of the bytes at quality 90) or PNG (lossless). Compressing costs the client an encode and the
server a decode per frame: a trade for links where bandwidth, not CPU, is short.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypeVar

import numpy as np
from google.protobuf.message import DecodeError, Message
from numpy.typing import NDArray
from PIL import Image

from ._proto import classifier_pb2 as pb
from .preprocess import Interpolation, PreprocessSpec, ResizePolicy
from .types import Classification, ModelInfo, Prediction, ServerTiming, StreamView

CHANNELS = 3
# Client-supplied text quoted in an error message is cut to this many characters: an error
# must stay small whatever a client sends (gRPC carries it in a size-limited header).
MAX_QUOTED_CHARS = 64

M = TypeVar("M", bound=Message)

_RESIZE_TO_PROTO: dict[ResizePolicy, pb.ResizePolicy.ValueType] = {
    "shorter_side_then_center_crop": pb.RESIZE_POLICY_SHORTER_SIDE_THEN_CENTER_CROP,
    "stretch": pb.RESIZE_POLICY_STRETCH,
}
_INTERPOLATION_TO_PROTO: dict[Interpolation, pb.Interpolation.ValueType] = {
    "nearest": pb.INTERPOLATION_NEAREST,
    "bilinear": pb.INTERPOLATION_BILINEAR,
    "bicubic": pb.INTERPOLATION_BICUBIC,
}
_RESIZE_FROM_PROTO: dict[pb.ResizePolicy.ValueType, ResizePolicy] = {
    v: k for k, v in _RESIZE_TO_PROTO.items()
}
_INTERPOLATION_FROM_PROTO: dict[pb.Interpolation.ValueType, Interpolation] = {
    v: k for k, v in _INTERPOLATION_TO_PROTO.items()
}


EncodingName: TypeAlias = Literal["raw", "jpeg", "png"]

_ENCODING_TO_PROTO: dict[str, pb.ImageEncoding.ValueType] = {
    "raw": pb.IMAGE_ENCODING_RAW,
    "jpeg": pb.IMAGE_ENCODING_JPEG,
    "png": pb.IMAGE_ENCODING_PNG,
}
_ENCODING_FROM_PROTO: dict[pb.ImageEncoding.ValueType, str] = {
    v: k for k, v in _ENCODING_TO_PROTO.items()
}
#: What a server built with this module accepts, in ModelInfo.encodings.
SERVER_ENCODINGS: tuple[str, ...] = ("raw", "jpeg", "png")
# PNG's zlib level: 1 is several times faster than the default 6 for a few percent more bytes.
_PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True, slots=True)
class Encoding:
    """How a client sends its prepared images: ``raw``, ``jpeg`` (at ``quality``) or ``png``.

    Raises:
        ValueError: An unknown name, or a quality outside 1-95 (Pillow's useful range).
    """

    name: EncodingName = "raw"
    quality: int = 90

    def __post_init__(self) -> None:
        if self.name not in _ENCODING_TO_PROTO:
            msg = f"wire must be one of {sorted(_ENCODING_TO_PROTO)}, got {self.name!r}"
            raise ValueError(msg)
        if isinstance(self.quality, bool) or not isinstance(self.quality, int):
            raise ValueError(f"quality must be an integer, got {self.quality!r}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"quality must be between 1 and 95, got {self.quality}")


RAW = Encoding()


class WireFormatError(ValueError):
    """A message does not hold what the protocol requires; the text says what is wrong."""


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


def decode(message_type: type[M], raw: bytes) -> M:
    """Parse ``raw`` as a ``message_type``; bytes that are not one raise WireFormatError."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        # Raised outside the handler: the parser's error (and its traceback) is not kept.
        pass
    raise WireFormatError(
        f"the bytes received ({len(raw)}) are not a valid {message_type.DESCRIPTOR.full_name} "
        "message; send one built from framecast.v1's .proto"
    )


def image_to_proto(image: NDArray[np.uint8], encoding: Encoding = RAW) -> pb.Image:
    """Wrap one preprocessed uint8 [H, W, 3] RGB image, in ``encoding``."""
    message = pb.Image()
    _fill_image(message, image, encoding)
    return message


def classify_request(
    batch: NDArray[np.uint8],
    *,
    top_k: int,
    preprocessing_id: str = "",
    encoding: Encoding = RAW,
) -> pb.ClassifyRequest:
    """A Classify request for preprocessed images uint8 [N, H, W, 3].

    ``preprocessing_id``: the ModelInfo.preprocessing_id the images were prepared for, or ""
    when the caller cannot vouch for how they were prepared.
    """
    request = pb.ClassifyRequest(top_k=top_k, preprocessing_id=preprocessing_id)
    for image in batch:
        # Filled in place: wrapping a finished Image message would copy its 150 KB again.
        _fill_image(request.images.add(), image, encoding)
    return request


def classify_request_bytes(
    batch: NDArray[np.uint8],
    *,
    top_k: int,
    preprocessing_id: str = "",
    encoding: Encoding = RAW,
) -> bytes:
    """The serialized :func:`classify_request`, written directly: what the SDK sends.

    The same bytes protobuf would write, with one copy of each raw image (into the result)
    instead of three (into the message, out of it, and the array's own ``tobytes``).
    """
    varint = encode_varint
    parts: list[bytes | memoryview] = []
    for image in batch:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != CHANNELS:
            raise WireFormatError(
                f"expected a uint8 array of shape [H, W, 3], got {image.dtype} {image.shape}"
            )
        height, width, channels = image.shape
        data: bytes | memoryview
        if encoding.name == "raw":
            data = np.ascontiguousarray(image).data.cast("B")
        else:
            data = _encode(image, encoding)
        header = b"\x0a" + varint(len(data)) if len(data) else b""
        trailer = b""
        for tag, value in ((0x10, height), (0x18, width), (0x20, channels)):
            if value:
                trailer += bytes((tag,)) + varint(value)
        if encoding.name != "raw":
            trailer += b"\x28" + varint(_ENCODING_TO_PROTO[encoding.name])
        parts.append(b"\x0a" + varint(len(header) + len(data) + len(trailer)) + header)
        parts.append(data)
        parts.append(trailer)
    parts.append(b"\x10" + varint(top_k))
    if preprocessing_id:
        stated = preprocessing_id.encode()
        parts.append(b"\x1a" + varint(len(stated)) + stated)
    return b"".join(parts)


def encoded_size(image: NDArray[np.uint8], encoding: Encoding) -> int:
    """The bytes one image takes on the wire in ``encoding`` (for planning request sizes)."""
    if encoding.name == "raw":
        return int(image.size)
    return len(_encode(image, encoding))


def _encode(image: NDArray[np.uint8], encoding: Encoding) -> bytes:
    buffer = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image))
    if encoding.name == "jpeg":
        # 4:4:4: the prepared image is small and chroma subsampling would blur its colours
        # at the model's own resolution.
        pil.save(buffer, "JPEG", quality=encoding.quality, subsampling=0)
    else:
        pil.save(buffer, "PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _fill_image(message: pb.Image, image: NDArray[np.uint8], encoding: Encoding = RAW) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != CHANNELS:
        raise WireFormatError(
            f"expected a uint8 array of shape [H, W, 3], got {image.dtype} {image.shape}"
        )
    message.height, message.width, message.channels = image.shape
    if encoding.name == "raw":
        message.data = np.ascontiguousarray(image).tobytes()
    else:
        message.encoding = _ENCODING_TO_PROTO[encoding.name]
        message.data = _encode(image, encoding)


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
    name = _ENCODING_FROM_PROTO.get(encoding)  # type: ignore[call-overload]
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


def encodings_to_proto(names: Sequence[str]) -> list[pb.ImageEncoding.ValueType]:
    """ModelInfo.encodings for the encodings a server accepts."""
    return [_ENCODING_TO_PROTO[name] for name in names]


def top_k_from_proto(value: int | None, *, num_classes: int, default: int) -> int:
    """The top_k a request asks for: its default when unset, else 1..num_classes."""
    if value is None:
        return default
    if not 1 <= value <= num_classes:
        raise WireFormatError(f"top_k must be between 1 and {num_classes}, got {value}")
    return value


def fill_classification(
    message: pb.Classification,
    indices: Sequence[int],
    probabilities: Sequence[float],
    labels: Sequence[str],
    *,
    queue_us: int,
    compute_us: int,
    batch_size: int,
) -> None:
    """Fill one image's result in place from its top-k indices and probabilities (best first).

    In place, inside the response being built: a finished Classification would be copied again.
    """
    for index, probability in zip(indices, probabilities, strict=True):
        message.predictions.add(index=index, label=labels[index], probability=probability)
    timing = message.timing
    timing.queue_us = queue_us
    timing.compute_us = compute_us
    timing.batch_size = batch_size


def encode_varint(value: int) -> bytes:
    """A non-negative integer as protobuf's base-128 varint."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_FLOAT = struct.Struct("<f")


class ClassificationEncoder:
    """Writes ClassifyResponse bytes directly, as protobuf would serialize the same message.

    For the server's unary path: no message objects are built per result. Each label's
    encoding is made once per model (on first use).
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self._labels = labels
        self._label_fields: dict[int, bytes] = {}

    def _label_field(self, index: int) -> bytes:
        field = self._label_fields.get(index)
        if field is None:
            label = self._labels[index].encode()
            field = b"\x12" + encode_varint(len(label)) + label if label else b""
            self._label_fields[index] = field
        return field

    def classification(
        self,
        indices: Sequence[int],
        probabilities: Sequence[float],
        *,
        queue_us: int,
        compute_us: int,
        batch_size: int,
    ) -> bytes:
        """One Classification message's bytes (as :func:`fill_classification` fills one)."""
        varint, parts = encode_varint, []
        for index, probability in zip(indices, probabilities, strict=True):
            prediction = self._label_field(index)
            if index:
                prediction = b"\x08" + varint(index) + prediction
            value = _FLOAT.pack(probability)
            if value != b"\x00\x00\x00\x00":
                prediction += b"\x1d" + value
            parts.append(b"\x0a" + varint(len(prediction)) + prediction)
        timing = b""
        if queue_us:
            timing += b"\x08" + varint(queue_us)
        if compute_us:
            timing += b"\x10" + varint(compute_us)
        if batch_size:
            timing += b"\x18" + varint(batch_size)
        parts.append(b"\x12" + varint(len(timing)) + timing)
        return b"".join(parts)

    @staticmethod
    def response(classifications: Sequence[bytes]) -> bytes:
        """A ClassifyResponse's bytes from its results' Classification bytes, in order."""
        varint = encode_varint
        return b"".join(b"\x0a" + varint(len(c)) + c for c in classifications)


def classification_from_proto(message: pb.Classification) -> Classification:
    """Turn one result message into the typed result."""
    timing = None
    if message.HasField("timing"):
        t = message.timing
        timing = ServerTiming(
            queue_ms=t.queue_us / 1000.0,
            compute_ms=t.compute_us / 1000.0,
            batch_size=t.batch_size,
        )
    return Classification(
        predictions=tuple(
            Prediction(index=p.index, label=p.label, probability=p.probability)
            for p in message.predictions
        ),
        timing=timing,
    )


def preprocessing_to_proto(spec: PreprocessSpec, *, normalization: str) -> pb.Preprocessing:
    """Describe the preprocessing a client must apply."""
    return pb.Preprocessing(
        input_height=spec.input_height,
        input_width=spec.input_width,
        resize_policy=_RESIZE_TO_PROTO[spec.resize_policy],
        resize_size=spec.resize_size,
        interpolation=_INTERPOLATION_TO_PROTO[spec.interpolation],
        normalization=normalization,
    )


def preprocessing_id(message: pb.Preprocessing) -> str:
    """The fingerprint of a preprocessing description (ModelInfo.preprocessing_id).

    Computed by the server only; clients echo it. It covers what the client does to the
    pixels, not the normalization, which the server applies itself: a model that only
    normalizes differently takes the same images. Deterministic serialization: equal
    descriptions give equal ids.
    """
    pixels = pb.Preprocessing()
    pixels.CopyFrom(message)
    pixels.ClearField("normalization")
    return hashlib.sha256(pixels.SerializeToString(deterministic=True)).hexdigest()[:16]


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


def preprocessing_from_proto(message: pb.Preprocessing) -> PreprocessSpec:
    """Read the server's preprocessing; unknown enum values are an error, not a guess."""
    try:
        resize_policy = _RESIZE_FROM_PROTO[message.resize_policy]
        interpolation = _INTERPOLATION_FROM_PROTO[message.interpolation]
    except KeyError as exc:
        raise WireFormatError(
            f"the server asks for a preprocessing this client does not know ({message}); "
            "upgrade framecast-client"
        ) from exc
    return PreprocessSpec(
        input_height=message.input_height,
        input_width=message.input_width,
        resize_policy=resize_policy,
        resize_size=message.resize_size,
        interpolation=interpolation,
    )


def model_info_from_proto(message: pb.ModelInfo) -> ModelInfo:
    """Turn GetModelInfo's answer into the typed ModelInfo."""
    return ModelInfo(
        name=message.name,
        version=message.version,
        backend=message.backend,
        precision=message.precision,
        max_batch=message.max_batch,
        preprocessing=preprocessing_from_proto(message.preprocessing),
        normalization=message.preprocessing.normalization,
        pretrained=message.pretrained,
        weights_source=message.weights_source,
        warning=message.warning,
        labels=tuple(message.labels),
        max_message_bytes=message.max_message_bytes,
        preprocessing_id=message.preprocessing_id,
        max_calls_per_connection=message.max_calls_per_connection,
        # Unknown (newer) encodings are left out: this client cannot send them anyway.
        encodings=tuple(
            ["raw"]
            + [
                _ENCODING_FROM_PROTO[e]
                for e in message.encodings
                if e in _ENCODING_FROM_PROTO and e != pb.IMAGE_ENCODING_RAW
            ]
        ),
    )


def stream_view_from_proto(message: pb.StreamInfo) -> StreamView:
    """One entry of a ListStreams answer, as the SDK's type."""
    return StreamView(
        id=message.id,
        caller=message.caller,
        name=message.name,
        started_unix_s=message.started_unix_ms / 1000,
        frames_in_per_s=message.frames_in_per_s,
        frames_out_per_s=message.frames_out_per_s,
        p99_latency_ms=message.p99_latency_ms,
        p99_age_ms=message.p99_age_ms,
        frames_in=message.frames_in,
        frames_out=message.frames_out,
        dropped=message.dropped,
        max_age_ms=message.max_age_ms,
        rate_hint_fps=message.rate_hint_fps,
    )
