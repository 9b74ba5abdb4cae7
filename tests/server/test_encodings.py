"""Compressed wire encodings: raw, JPEG (lossy) and PNG (lossless) through a real server."""

from __future__ import annotations

import threading
from typing import Any, cast

import grpc
import numpy as np
import pytest
from framecast_client import AsyncClient, Client, wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.errors import InvalidArgumentError
from framecast_server.process.background import BackgroundServer
from framecast_server.service.codecs import requests
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter


def photo_like(count: int, seed: int = 0) -> NDArray[np.uint8]:
    """Prepared 224x224 frames that look like photos: smooth shading, shapes, mild noise."""
    rng = np.random.default_rng(seed)
    frames = np.empty((count, 224, 224, 3), dtype=np.uint8)
    _, x = np.mgrid[0:224, 0:224].astype(np.float32)
    for i in range(count):
        base = rng.uniform(40, 200, 3)
        shade = np.stack([base[c] + 40 * np.sin(x / 30 + c + i) for c in range(3)], axis=-1)
        image = Image.fromarray(
            np.clip(shade + rng.normal(0, 3, shade.shape), 0, 255).astype(np.uint8)
        )
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, 180, 2))
            draw.ellipse(
                (x0, y0, x0 + 40, y0 + 30), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
            )
        frames[i] = np.asarray(image.filter(ImageFilter.GaussianBlur(0.8)))
    return frames


def test_model_info_advertises_the_encodings(client: Client) -> None:
    assert client.model_info().encodings == ("raw", "jpeg", "png")


def test_png_is_lossless_so_results_equal_raw(onnx_server: BackgroundServer) -> None:
    frames = photo_like(3)
    with (
        Client(onnx_server.address, timeout=60) as raw,
        Client(onnx_server.address, timeout=60, wire="png") as png,
    ):
        expected = raw.classify_preprocessed(frames, top_k=5)
        got = png.classify_preprocessed(frames, top_k=5)
    assert [r.predictions for r in got] == [r.predictions for r in expected]


def test_jpeg_round_trip_is_close_and_the_server_classifies_it(
    onnx_server: BackgroundServer,
) -> None:
    frames = photo_like(4, seed=1)
    for frame in frames:
        message = wire.image_to_proto(frame, wire.Encoding("jpeg", quality=90))
        assert message.encoding == pb.IMAGE_ENCODING_JPEG
        assert len(message.data) < frame.nbytes / 4  # the point of it
        decoded = requests.image_from_proto(message, height=224, width=224)
        assert np.abs(decoded.astype(np.int16) - frame).mean() < 2.0
    with Client(onnx_server.address, timeout=60, wire="jpeg", quality=90) as client:
        results = client.classify_preprocessed(frames, top_k=5)
    assert len(results) == 4
    assert all(len(r.predictions) == 5 for r in results)


async def test_async_client_and_streams_send_encoded_frames(
    onnx_server: BackgroundServer,
) -> None:
    frames = photo_like(3, seed=2)
    async with AsyncClient(onnx_server.address, timeout=60) as raw:
        expected = await raw.classify_preprocessed(frames, top_k=3)
    async with AsyncClient(onnx_server.address, timeout=60, wire="png") as png:
        assert [r.predictions for r in await png.classify_preprocessed(frames, top_k=3)] == [
            r.predictions for r in expected
        ]
    # Streams preprocess their frames (here: 224 -> 232 -> crop 224) as the server says; a
    # raw stream of the same frames is what a PNG stream must match.
    streamed = {}
    for name in ("raw", "png"):
        with (
            Client(onnx_server.address, timeout=60, wire=name) as client,
            client.stream(list(frames), top_k=3, mode="lossless") as session,
        ):
            streamed[name] = [r.classification.predictions for r in session if r.classification]
    assert len(streamed["png"]) == 3
    assert streamed["png"] == streamed["raw"]


def test_encoded_frames_are_decoded_off_the_event_loop(
    onnx_server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    original = requests.image_from_proto

    def spy(*args: Any, **kwargs: Any) -> NDArray[np.uint8]:
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(requests, "image_from_proto", spy)
    frames = photo_like(2, seed=3)
    with Client(onnx_server.address, timeout=60, wire="jpeg") as client:
        client.classify_preprocessed(frames)
        with client.stream(list(frames), mode="lossless") as session:
            assert all(result.ok for result in session)
    assert len(threads) == 4
    assert all(name.startswith("framecast-decode") for name in threads), threads


@pytest.mark.parametrize(
    ("data", "encoding", "fragment"),
    [
        (b"not a jpeg", pb.IMAGE_ENCODING_JPEG, "not a valid jpeg"),
        (b"\x89PNG nonsense", pb.IMAGE_ENCODING_PNG, "not a valid png"),
        (b"x", 7, "encoding 7"),
    ],
    ids=["bad-jpeg", "bad-png", "unknown-encoding"],
)
def test_bad_encoded_images_are_invalid_argument_and_the_server_goes_on(
    onnx_server: BackgroundServer, data: bytes, encoding: int, fragment: str
) -> None:
    image = pb.Image(data=data, height=224, width=224, channels=3)
    image.encoding = cast("pb.ImageEncoding.ValueType", encoding)
    with grpc.insecure_channel(onnx_server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Classify(pb.ClassifyRequest(images=[image]), timeout=30)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in (failed.value.details() or "")
        # A stream frame fails alone; the stream and the server go on.
        good = wire.image_to_proto(photo_like(1)[0], wire.Encoding("jpeg"))
        replies = list(
            stub.ClassifyStream(
                iter(
                    [
                        pb.StreamRequest(frame_id=1, image=image),
                        pb.StreamRequest(frame_id=2, image=good),
                    ]
                ),
                timeout=30,
            )
        )
    assert [r.frame_id for r in replies] == [1, 2]
    assert replies[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert fragment in replies[0].error.message
    assert replies[1].HasField("classification")


def test_a_jpeg_of_the_wrong_size_is_refused(onnx_server: BackgroundServer) -> None:
    small = wire.image_to_proto(photo_like(1)[0][:100, :120].copy(), wire.Encoding("jpeg"))
    small.height, small.width = 224, 224  # the header says 224, the JPEG is 100x120
    with (
        grpc.insecure_channel(onnx_server.address) as channel,
        pytest.raises(grpc.RpcError) as failed,
    ):
        pb_grpc.ClassifierStub(channel).Classify(pb.ClassifyRequest(images=[small]), timeout=30)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "jpeg of 100x120" in (failed.value.details() or "")


def test_a_server_that_does_not_accept_the_encoding_is_told_before_sending(
    onnx_server: BackgroundServer,
) -> None:
    import dataclasses

    with Client(onnx_server.address, timeout=60, wire="jpeg") as client:
        # As an older server describes itself: no encodings listed, so raw only.
        client._model_info = dataclasses.replace(client.model_info(), encodings=("raw",))
        with pytest.raises(InvalidArgumentError, match="does not accept jpeg images"):
            client.classify_preprocessed(photo_like(1))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"wire": "gif"}, "wire must be one of"),
        ({"wire": "jpeg", "quality": 0}, "between 1 and 95"),
        ({"wire": "jpeg", "quality": 96}, "between 1 and 95"),
        ({"wire": "jpeg", "quality": True}, "integer"),
    ],
)
def test_bad_wire_settings_are_value_errors(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Client("127.0.0.1:1", **kwargs)
