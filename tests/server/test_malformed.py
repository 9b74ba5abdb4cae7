"""Bytes that are not a valid message get INVALID_ARGUMENT, and client text is quoted short."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_server.process.background import BackgroundServer
from support import RawClassifier, random_frames

GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, a length far past the end


@pytest.fixture
def raw(onnx_server: BackgroundServer) -> Iterator[RawClassifier]:
    stub = RawClassifier(onnx_server.address)
    yield stub
    stub.close()


def good_request() -> bytes:
    return wire.classify_request_bytes(random_frames(1), top_k=2)


@pytest.mark.parametrize("method", ["classify", "get_model_info"])
def test_undecodable_bytes_get_invalid_argument_and_one_log_line(
    method: str, raw: RawClassifier, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(50):
        code, details = raw.status(method, GARBAGE)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "are not a valid framecast.v1." in details
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    # Rate limited: at most one line for the 50 (one more if an earlier test's window ended).
    assert len([r for r in caplog.records if "malformed" in r.getMessage()]) <= 1
    assert raw.status("classify", good_request())[0] is grpc.StatusCode.OK


def test_health_check_with_undecodable_bytes_gets_invalid_argument(
    onnx_server: BackgroundServer,
) -> None:
    with grpc.insecure_channel(onnx_server.address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")  # type: ignore[call-arg]
        with pytest.raises(grpc.RpcError) as caught:
            check(GARBAGE, timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "/grpc.health.v1.Health/Check" in (caught.value.details() or "")


def test_an_undecodable_frame_is_a_per_frame_error_and_the_stream_goes_on(
    raw: RawClassifier,
) -> None:
    frame = pb.StreamRequest(frame_id=5, image=wire.image_to_proto(random_frames(1)[0]))
    frames = [frame.SerializeToString(), GARBAGE, frame.SerializeToString()]
    answers = [pb.StreamResponse.FromString(r) for r in raw.stream(iter(frames), timeout=60)]
    assert [a.frame_id for a in answers] == [5, 0, 5]
    assert answers[0].HasField("classification")
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "not a valid framecast.v1.StreamRequest" in answers[1].error.message
    assert answers[2].HasField("classification")


def test_client_text_in_an_error_is_cut_short(raw: RawClassifier) -> None:
    request = wire.classify_request_bytes(random_frames(1), top_k=1, preprocessing_id="p" * 16_000)
    code, details = raw.status("classify", request)
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert "(16000 characters)" in details
    assert len(details) < 400


def test_truncated_requests_get_invalid_argument_never_unknown(raw: RawClassifier) -> None:
    """Classify reads plain requests straight from their bytes; cut ones are still refused."""
    request = good_request()
    for end in (1, 2, 5, 20, len(request) // 2, len(request) - 1):
        code, details = raw.status("classify", request[:end])
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (end, code, details)
        assert "are not a valid framecast.v1.ClassifyRequest" in details
    assert raw.status("classify", request)[0] is grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("raw_request", "code", "words"),
    [
        # top_k 0 and a frame of the wrong size: refused by the same checks on either path.
        (b"\x10\x00", grpc.StatusCode.INVALID_ARGUMENT, "top_k must be between 1 and"),
        (b"", grpc.StatusCode.INVALID_ARGUMENT, "holds no images"),
        (b"\x0a\x07\x0a\x01\x00\x10\x01\x18\x01", grpc.StatusCode.INVALID_ARGUMENT, "channels"),
        (b"\x1a\x02\xff\xfe", grpc.StatusCode.INVALID_ARGUMENT, "not a valid"),  # not UTF-8
    ],
    ids=["top-k-0", "no-images", "no-channels", "id-not-utf8"],
)
def test_bad_requests_read_from_their_bytes_get_clear_errors(
    raw: RawClassifier, raw_request: bytes, code: grpc.StatusCode, words: str
) -> None:
    answer, details = raw.status("classify", raw_request)
    assert answer is code
    assert words in details
    assert raw.status("classify", good_request())[0] is grpc.StatusCode.OK


def test_a_request_with_fields_it_does_not_know_is_answered_as_protobuf_reads_it(
    raw: RawClassifier,
) -> None:
    frame = random_frames(1, seed=3)
    plain = wire.classify_request_bytes(frame, top_k=2)
    # Field 9 (unknown to this server): skipped by protobuf, so taken by the general path.
    answers = [
        pb.ClassifyResponse.FromString(raw.classify(request, timeout=30))
        for request in (plain, plain + b"\x48\x01")
    ]
    assert answers[0].results[0].predictions == answers[1].results[0].predictions
    assert len(answers[0].results[0].predictions) == 2
