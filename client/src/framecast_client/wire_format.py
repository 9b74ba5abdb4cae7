"""The framecast.v1 wire format both ends share, beyond what the .proto says; defined once.

The client writes requests and reads results with it (:mod:`framecast_client.wire`), the server
reads requests and writes results with it (``framecast_server.service.codecs``). It imports
nothing but the generated messages, so depending on it never pulls either side's code along.
"""

from __future__ import annotations

from ._proto import classifier_pb2 as pb

#: Images travel as RGB: three uint8 channels, height x width x channels.
CHANNELS = 3

#: An image encoding's name (as ``Encoding`` and ModelInfo spell it) <-> its enum value.
ENCODING_TO_PROTO: dict[str, pb.ImageEncoding.ValueType] = {
    "raw": pb.IMAGE_ENCODING_RAW,
    "jpeg": pb.IMAGE_ENCODING_JPEG,
    "png": pb.IMAGE_ENCODING_PNG,
}
ENCODING_FROM_PROTO: dict[pb.ImageEncoding.ValueType, str] = {
    v: k for k, v in ENCODING_TO_PROTO.items()
}
#: A resize policy's name (as PreprocessSpec and the server's presets spell it) <-> its value.
RESIZE_TO_PROTO: dict[str, pb.ResizePolicy.ValueType] = {
    "shorter_side_then_center_crop": pb.RESIZE_POLICY_SHORTER_SIDE_THEN_CENTER_CROP,
    "stretch": pb.RESIZE_POLICY_STRETCH,
}
RESIZE_FROM_PROTO: dict[pb.ResizePolicy.ValueType, str] = {v: k for k, v in RESIZE_TO_PROTO.items()}
#: An interpolation's name <-> its enum value.
INTERPOLATION_TO_PROTO: dict[str, pb.Interpolation.ValueType] = {
    "nearest": pb.INTERPOLATION_NEAREST,
    "bilinear": pb.INTERPOLATION_BILINEAR,
    "bicubic": pb.INTERPOLATION_BICUBIC,
}
INTERPOLATION_FROM_PROTO: dict[pb.Interpolation.ValueType, str] = {
    v: k for k, v in INTERPOLATION_TO_PROTO.items()
}


class WireFormatError(ValueError):
    """A message does not hold what the protocol requires; the text says what is wrong."""


def encode_varint(value: int) -> bytes:
    """A non-negative integer as protobuf's base-128 varint (for bytes written by hand)."""
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
