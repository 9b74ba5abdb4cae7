"""Classify's request bytes, written directly by the SDK (``framecast_client.wire``) and read
directly by the server (``framecast_server.service.codecs.requests``), mean what protobuf says.

The reader takes only plain requests of raw images and leaves everything else to protobuf's
parser (returns None); whatever it accepts, it reads as protobuf would. The writer produces the
bytes protobuf would serialize for the same message.
"""

from __future__ import annotations

import numpy as np
import pytest
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire_format import WireFormatError
from framecast_server.service.codecs import requests
from google.protobuf.message import DecodeError
from numpy.typing import NDArray

SIZE = 4  # the reader does not care about image sizes: small images keep the cases cheap


def frames(count: int, *, seed: int = 0, size: int = SIZE) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def agrees_with_protobuf(raw: bytes) -> requests.RawClassifyRequest | None:
    """Read ``raw`` both ways; whatever the reader accepts must parse the same with protobuf."""
    read = requests.read_classify_request(raw)
    if read is None:
        return None
    message = pb.ClassifyRequest.FromString(raw)  # raises if the reader took an invalid message
    assert read.top_k == (message.top_k if message.HasField("top_k") else None)
    assert read.preprocessing_id == message.preprocessing_id
    assert len(read.images) == len(message.images)
    for (offset, size, height, width, channels), image in zip(
        read.images, message.images, strict=True
    ):
        assert raw[offset : offset + size] == image.data
        assert (height, width, channels) == (image.height, image.width, image.channels)
        assert image.encoding == pb.IMAGE_ENCODING_RAW
    return read


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("top_k", [None, 0, 1, 1000])
@pytest.mark.parametrize("preprocessing_id", ["", "0123456789abcdef", "é"])
def test_plain_requests_are_read_as_protobuf_reads_them(
    count: int, top_k: int | None, preprocessing_id: str
) -> None:
    request = pb.ClassifyRequest(preprocessing_id=preprocessing_id)
    if top_k is not None:
        request.top_k = top_k
    for image in frames(count):
        request.images.append(wire.image_to_proto(image))
    read = agrees_with_protobuf(request.SerializeToString())
    assert read is not None
    batch = read.batch(height=SIZE, width=SIZE, max_batch=8)
    expected = requests.images_from_proto(request.images, height=SIZE, width=SIZE, max_batch=8)
    np.testing.assert_array_equal(batch, expected)
    assert batch.shape == (count, SIZE, SIZE, 3)


def test_one_image_is_a_view_of_the_received_bytes() -> None:
    raw = wire.classify_request_bytes(frames(1), top_k=1)
    read = requests.read_classify_request(raw)
    assert read is not None
    batch = read.batch(height=SIZE, width=SIZE, max_batch=8)
    assert not batch.flags.writeable  # a view of the (immutable) request bytes, not a copy
    assert np.shares_memory(batch, np.frombuffer(raw, np.uint8))


def test_every_truncation_and_byte_flip_is_refused_or_read_as_protobuf_reads_it() -> None:
    raw = wire.classify_request_bytes(frames(2), top_k=3, preprocessing_id="abc")
    for end in range(len(raw)):
        agrees_with_protobuf(raw[:end])
    rng = np.random.default_rng(1)
    for _ in range(3000):
        mutated = bytearray(raw)
        for position in rng.integers(0, len(raw), int(rng.integers(1, 4))):
            mutated[position] = int(rng.integers(0, 256))
        try:
            agrees_with_protobuf(bytes(mutated))
        except DecodeError:
            pytest.fail(f"the reader accepted bytes protobuf refuses: {bytes(mutated)!r}")


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\xff\xff\xff\xff\x0f",  # a length far past the end
        b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # top_k as a 10-byte varint
        b"\x1a\x02\xff\xfe",  # preprocessing_id that is not UTF-8
        b"\x0a\x02\x28\x01",  # a JPEG image: decoded from the parsed message, off the loop
        b"\x0a\x00\x20\x03",  # an unknown field (4) in the request
        b"\x12\x00",  # top_k's number with the wrong wire type
        b"\x0a\x03\x0a\x05\x00",  # an image whose data runs past the image's own end
        b"\x0b",  # a group start
    ],
)
def test_anything_but_a_plain_request_is_left_to_protobuf(raw: bytes) -> None:
    assert requests.read_classify_request(raw) is None


def test_repeated_scalar_fields_keep_the_last_value_as_protobuf_does() -> None:
    raw = b"\x10\x01\x10\x07\x1a\x01a\x1a\x01b" + wire.classify_request_bytes(frames(1), top_k=2)
    read = agrees_with_protobuf(raw)
    assert read is not None
    assert (read.top_k, read.preprocessing_id) == (2, "b")


@pytest.mark.parametrize(
    ("images", "max_batch"),
    [
        ([], 8),
        ([wire.image_to_proto(f) for f in frames(3)], 2),
        ([pb.Image(data=b"\x00" * SIZE * SIZE * 4, height=SIZE, width=SIZE, channels=4)], 8),
        ([wire.image_to_proto(frames(1, size=SIZE + 1)[0])], 8),
        ([pb.Image(data=b"\x00" * 5, height=SIZE, width=SIZE, channels=3)], 8),
        ([wire.image_to_proto(frames(1)[0]), pb.Image(height=SIZE, width=SIZE, channels=3)], 8),
    ],
    ids=["none", "too-many", "channels", "size", "bytes", "second-empty"],
)
def test_bad_images_are_refused_with_the_same_message_either_way(
    images: list[pb.Image], max_batch: int
) -> None:
    raw = pb.ClassifyRequest(images=images).SerializeToString()
    read = requests.read_classify_request(raw)
    assert read is not None
    with pytest.raises(WireFormatError) as by_protobuf:
        requests.images_from_proto(images, height=SIZE, width=SIZE, max_batch=max_batch)
    with pytest.raises(WireFormatError) as directly:
        read.batch(height=SIZE, width=SIZE, max_batch=max_batch)
    assert str(directly.value) == str(by_protobuf.value)


def protobufs_request(
    batch: NDArray[np.uint8], top_k: int, preprocessing_id: str, encoding: wire.Encoding
) -> bytes:
    """The same request as protobuf serializes it: the oracle for the bytes the SDK writes."""
    images = [wire.image_to_proto(image, encoding) for image in batch]
    request = pb.ClassifyRequest(images=images, top_k=top_k, preprocessing_id=preprocessing_id)
    return request.SerializeToString()


@pytest.mark.parametrize("encoding", [wire.RAW, wire.Encoding("png")], ids=["raw", "png"])
@pytest.mark.parametrize("count", [1, 3])
def test_request_bytes_are_what_protobuf_serializes(encoding: wire.Encoding, count: int) -> None:
    batch = frames(count, size=8)
    for top_k, preprocessing_id in ((1, ""), (0, "0123456789abcdef"), (300, "é")):
        expected = protobufs_request(batch, top_k, preprocessing_id, encoding)
        written = wire.classify_request_bytes(
            batch, top_k=top_k, preprocessing_id=preprocessing_id, encoding=encoding
        )
        assert written == expected


def test_request_bytes_of_a_non_contiguous_batch() -> None:
    batch = frames(2, size=8)[:, :, ::2]
    assert not batch.flags.c_contiguous
    expected = protobufs_request(batch, 1, "", wire.RAW)
    assert wire.classify_request_bytes(batch, top_k=1) == expected


def test_request_bytes_refuse_what_is_not_an_rgb_uint8_batch() -> None:
    with pytest.raises(WireFormatError, match="uint8 array of shape"):
        wire.classify_request_bytes(np.zeros((1, 4, 4, 4), np.uint8), top_k=1)
