"""framecast.v1 as the SDK speaks it: numpy and typed results <-> messages.

The client writes requests (:func:`classify_request_bytes` is what the SDK sends) and reads
results and the server's ModelInfo. The format both ends share is :mod:`.wire_format`; the
server's readers and writers are its own (``framecast_server.service.codecs``).

Images travel in one of three encodings (:class:`Encoding`): raw uint8 HWC bytes (150,528
bytes for 224x224, no CPU), or the prepared image compressed as JPEG (lossy, about a tenth
of the bytes at quality 90) or PNG (lossless). Compressing costs the client an encode and the
server a decode per frame: a trade for links where bandwidth, not CPU, is short.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal, TypeAlias, cast

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from ._proto import classifier_pb2 as pb
from .preprocess import Interpolation, PreprocessSpec, ResizePolicy
from .types import Classification, ModelInfo, Prediction, ServerTiming, StreamView
from .wire_format import (
    CHANNELS,
    ENCODING_FROM_PROTO,
    ENCODING_TO_PROTO,
    INTERPOLATION_FROM_PROTO,
    RESIZE_FROM_PROTO,
    WireFormatError,
    encode_varint,
)

EncodingName: TypeAlias = Literal["raw", "jpeg", "png"]

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
        if self.name not in ENCODING_TO_PROTO:
            msg = f"wire must be one of {sorted(ENCODING_TO_PROTO)}, got {self.name!r}"
            raise ValueError(msg)
        if isinstance(self.quality, bool) or not isinstance(self.quality, int):
            raise ValueError(f"quality must be an integer, got {self.quality!r}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"quality must be between 1 and 95, got {self.quality}")


RAW = Encoding()


def image_to_proto(image: NDArray[np.uint8], encoding: Encoding = RAW) -> pb.Image:
    """Wrap one preprocessed uint8 [H, W, 3] RGB image, in ``encoding``."""
    message = pb.Image()
    _fill_image(message, image, encoding)
    return message


def classify_request_bytes(
    batch: NDArray[np.uint8],
    *,
    top_k: int,
    preprocessing_id: str = "",
    encoding: Encoding = RAW,
) -> bytes:
    """A Classify request for preprocessed images uint8 [N, H, W, 3], serialized: what the
    SDK sends, and the one way it builds a Classify request.

    The same bytes protobuf would write for a ClassifyRequest of these images (the tests hold
    it to that), with one copy of each raw image (into the result) instead of three (into the
    message, out of it, and the array's own ``tobytes``). ``preprocessing_id``: the
    ModelInfo.preprocessing_id the images were prepared for, or "" when the caller cannot
    vouch for how they were prepared.
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
            trailer += b"\x28" + varint(ENCODING_TO_PROTO[encoding.name])
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
        message.encoding = ENCODING_TO_PROTO[encoding.name]
        message.data = _encode(image, encoding)


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


def preprocessing_from_proto(message: pb.Preprocessing) -> PreprocessSpec:
    """Read the server's preprocessing; unknown enum values are an error, not a guess."""
    try:
        # The shared tables hold exactly the names these Literal types allow.
        resize_policy = cast(ResizePolicy, RESIZE_FROM_PROTO[message.resize_policy])
        interpolation = cast(Interpolation, INTERPOLATION_FROM_PROTO[message.interpolation])
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
                ENCODING_FROM_PROTO[e]
                for e in message.encodings
                if e in ENCODING_FROM_PROTO and e != pb.IMAGE_ENCODING_RAW
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
