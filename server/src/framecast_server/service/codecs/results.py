"""framecast.v1 results and the model's description as the server writes them.

Unary results are written as bytes directly (:class:`ClassificationEncoder`), stream results
into the response message being built (:func:`fill_classification`): the same Classification
either way, as the tests check byte for byte.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire_format import (
    ENCODING_TO_PROTO,
    INTERPOLATION_TO_PROTO,
    RESIZE_TO_PROTO,
    encode_varint,
)

from ...model.presets import Preset


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


def preprocessing_to_proto(preset: Preset) -> pb.Preprocessing:
    """Describe the preprocessing a client must apply to feed a model of this preset."""
    return pb.Preprocessing(
        input_height=preset.input_size,
        input_width=preset.input_size,
        resize_policy=RESIZE_TO_PROTO[preset.resize_policy],
        resize_size=preset.resize_size,
        interpolation=INTERPOLATION_TO_PROTO[preset.interpolation],
        normalization=preset.normalization,
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


def encodings_to_proto(names: Sequence[str]) -> list[pb.ImageEncoding.ValueType]:
    """ModelInfo.encodings for the encodings a server accepts."""
    return [ENCODING_TO_PROTO[name] for name in names]
