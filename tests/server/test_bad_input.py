"""Bad input gets a clear status and message, and the server keeps serving.

Every case sends a malformed request over a raw stub, checks the status and message, then
proves the server still answers a good request.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from framecast_client import Client
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_server.process.background import BackgroundServer
from support import random_frames

FRAME = random_frames(1)[0]


@pytest.fixture
def stub(onnx_server: BackgroundServer) -> Iterator[pb_grpc.ClassifierStub]:
    # A generous client-side limit so the server's own limit is what a large request hits.
    options = [("grpc.max_send_message_length", 256 * 1024 * 1024)]
    with grpc.insecure_channel(onnx_server.address, options=options) as channel:
        yield pb_grpc.ClassifierStub(channel)


def image(array: np.ndarray = FRAME, **overrides: object) -> pb.Image:
    fields: dict[str, object] = {
        "data": array.tobytes(),
        "height": array.shape[0],
        "width": array.shape[1],
        "channels": array.shape[2] if array.ndim == 3 else 1,
    }
    fields.update(overrides)
    return pb.Image(**fields)  # type: ignore[arg-type]


def rejected(stub: pb_grpc.ClassifierStub, request: pb.ClassifyRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(request, timeout=30)
    return caught.value


def still_serves(client: Client) -> None:
    result = client.classify(FRAME, top_k=3)
    assert len(result.predictions) == 3


CASES = {
    "wrong byte count": (
        pb.ClassifyRequest(images=[image(data=FRAME.tobytes()[:-7])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "carries 150521 bytes",
    ),
    "wrong shape": (
        pb.ClassifyRequest(images=[image(random_frames(1, size=200)[0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "is 200x200 (HxW); this model takes 224x224",
    ),
    "wrong channel count": (
        pb.ClassifyRequest(images=[image(FRAME[:, :, 0])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "has 1 channels",
    ),
    "empty request": (
        pb.ClassifyRequest(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "holds no images",
    ),
    "more images than the max batch": (
        pb.ClassifyRequest(images=[image()] * 9),
        grpc.StatusCode.INVALID_ARGUMENT,
        "more than this server's max batch of 8",
    ),
    "top_k of 0": (
        pb.ClassifyRequest(images=[image()], top_k=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k must be between 1 and 1000, got 0",
    ),
    "top_k above the class count": (
        pb.ClassifyRequest(images=[image()], top_k=1001),
        grpc.StatusCode.INVALID_ARGUMENT,
        "top_k must be between 1 and 1000, got 1001",
    ),
    "message over the size limit": (
        # 8 frames fit (the max batch); 60 do not fit the server's receive limit.
        pb.ClassifyRequest(images=[image()] * 60),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_rejected_then_server_still_serves(
    case: str, stub: pb_grpc.ClassifierStub, client: Client
) -> None:
    request, code, message = CASES[case]
    error = rejected(stub, request)
    assert error.code() is code
    assert message in (error.details() or "")
    still_serves(client)


def test_bad_frame_in_a_stream_is_a_per_frame_error(
    stub: pb_grpc.ClassifierStub, client: Client
) -> None:
    frames = [
        pb.StreamRequest(frame_id=1, image=image()),
        pb.StreamRequest(frame_id=2, image=image(data=b"short")),
        pb.StreamRequest(frame_id=3, image=image(), top_k=0),
        pb.StreamRequest(frame_id=4, image=image(), top_k=2),
    ]
    responses = list(stub.ClassifyStream(iter(frames), timeout=60))
    assert [r.frame_id for r in responses] == [1, 2, 3, 4]
    assert responses[0].HasField("classification")
    assert responses[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "carries 5 bytes" in responses[1].error.message
    assert responses[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert len(responses[3].classification.predictions) == 2
    still_serves(client)
