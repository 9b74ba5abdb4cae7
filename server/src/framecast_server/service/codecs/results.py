"""framecast.v1 results and the model's description as the server writes them.

Unary and stream results alike are filled into the response message being built
(:func:`fill_classification`) and serialized by protobuf. A hand-written encoder of the unary
response's bytes was measured slower than protobuf's (upb) serializer (docs/unary-path.md) and
was dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire_format import (
    ENCODING_TO_PROTO,
    INTERPOLATION_TO_PROTO,
    RESIZE_TO_PROTO,
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
