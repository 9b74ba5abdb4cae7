"""Failed and rejected work leaves no reference cycles: memory returns without the cyclic GC.

A rejected frame's exception used to keep its traceback, whose frames held the exception and
the 150 KB request: freed only by a full collection, so an overloaded server grew by gigabytes.
Here the cyclic collector is off while a server refuses, fails and expires work of every kind;
then one collection with DEBUG_SAVEALL shows what only it could have freed: nothing of ours.
"""

from __future__ import annotations

import gc
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from framecast_bench import oip_codec as oip
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_oip._proto import open_inference_pb2 as oip_pb
from framecast_server.process.background import BackgroundServer
from numpy.typing import NDArray
from support import HoldableNullBackend, RawClassifier, make_settings, random_frames

FAIL_KEY = 7  # images with this key make the backend fail
POISON = f"cannot classify key {FAIL_KEY}"  # what the backend says when it does


def keyed(key: int) -> NDArray[np.uint8]:
    image = random_frames(1, seed=key)
    image[0, 0, 0, 0] = key
    return image


def request(key: int, **fields: object) -> bytes:
    message = pb.ClassifyRequest.FromString(wire.classify_request_bytes(keyed(key), top_k=1))
    for name, value in fields.items():
        setattr(message, name, value)
    return message.SerializeToString()


def frame(frame_id: int, key: int, **fields: object) -> bytes:
    message = pb.StreamRequest(frame_id=frame_id, image=wire.image_to_proto(keyed(key)[0]))
    for name, value in fields.items():
        setattr(message, name, value)
    return message.SerializeToString()


class Server:
    def __init__(self, server: BackgroundServer, backend: HoldableNullBackend) -> None:
        self.server = server
        self.backend = backend
        self.raw = RawClassifier(server.address)
        self.infer = self.raw.channel.unary_unary(  # type: ignore[call-arg]
            "/inference.GRPCInferenceService/ModelInfer"
        )
        self.oip_stream = self.raw.channel.stream_stream(  # type: ignore[call-arg]
            "/inference.GRPCInferenceService/ModelStreamInfer"
        )

    def oip_code(self, method: str, raw: bytes) -> grpc.StatusCode:
        call = self.raw.channel.unary_unary(  # type: ignore[call-arg]
            f"/inference.GRPCInferenceService/{method}"
        )
        try:
            call(raw, timeout=30)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    def infer_code(self, raw: bytes) -> grpc.StatusCode:
        # Not pytest.raises: its record of the error would be a cycle of the test's own.
        try:
            self.infer(raw, timeout=30)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    def code(self, raw: bytes, timeout: float = 30) -> grpc.StatusCode:
        return self.raw.status("classify", raw, timeout)[0]


@pytest.fixture
def served(cache_dir: Path) -> Iterator[Server]:
    backend = HoldableNullBackend(fail_key=FAIL_KEY)
    # Several calls of one connection in flight at once, to fill the queue.
    settings = make_settings(
        cache_dir, backend="null", max_batch=2, max_queue=2, max_streams_per_connection=8
    )
    with BackgroundServer(settings, backend_factory=lambda _: backend) as server:
        s = Server(server, backend)
        yield s
        backend.release()
        s.raw.close()


def refuse_fail_and_expire(s: Server) -> None:
    """Every way a call or a frame can fail, with real frames."""
    codes = {
        s.code(b"\xff\xff not a message"),
        s.code(request(1, preprocessing_id="x" * 16_000)),
        s.code(request(2, top_k=0)),
        s.code(request(FAIL_KEY)),
    }
    assert codes == {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INTERNAL,
    }
    # The Open Inference Protocol: a wrong shape, a wrong model.
    for bad in (
        oip.infer_request(keyed(3)[:, :100], model_name="resnet50"),
        oip.infer_request(keyed(3), model_name="no-such-model"),
    ):
        assert s.infer_code(bad.SerializeToString()) in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
        )
    # Its metadata, configuration and statistics of a model not served.
    unknown = {"name": "no-such-model"}
    for method, message in (
        ("ModelMetadata", oip_pb.ModelMetadataRequest(**unknown)),
        ("ModelConfig", oip_pb.ModelConfigRequest(**unknown)),
        ("ModelStatistics", oip_pb.ModelStatisticsRequest(**unknown)),
    ):
        assert s.oip_code(method, message.SerializeToString()) is grpc.StatusCode.NOT_FOUND
    # Its stream: requests refused, failed and answered.
    requests = [
        oip.infer_request(keyed(1), model_name="resnet50", request_id="1"),
        oip.infer_request(keyed(2)[:, :100], model_name="resnet50", request_id="2"),
        oip.infer_request(keyed(FAIL_KEY), model_name="resnet50", request_id="3"),
        oip.infer_request(keyed(4), model_name="no-such-model", request_id="4"),
        oip.infer_request(keyed(5), model_name="resnet50", request_id="5"),
    ]
    replies = [
        oip_pb.ModelStreamInferResponse.FromString(r)
        for r in s.oip_stream((r.SerializeToString() for r in requests), timeout=30)
    ]
    assert [bool(r.error_message) for r in replies[:4]] == [False, True, True, True]
    # The last request is answered, unless it rode in one batch with the failing one: a batch
    # fails as a whole (core/batcher.py), and then its error names the failing key's cause.
    assert not replies[4].error_message or POISON in replies[4].error_message
    # A full queue: one batch held in the backend, two waiting, the rest refused.
    s.backend.hold()
    s.backend.entered.clear()
    with ThreadPoolExecutor(3) as pool:
        held = [pool.submit(s.code, request(10))]
        assert s.backend.entered.wait(30)
        expired = s.code(request(40), timeout=0.2)  # waits behind the held batch, expires
        held += [pool.submit(s.code, request(11 + i)) for i in range(2)]
        serving = s.server.serving
        assert serving is not None
        while serving.batcher.queued < 2:
            pass
        refused = [s.code(request(20 + i)) for i in range(20)]
        s.backend.release()
        assert {f.result(30) for f in held} == {grpc.StatusCode.OK}
    assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert expired is grpc.StatusCode.DEADLINE_EXCEEDED
    frames = [
        frame(1, 1),
        b"\x0a\xff\xff\xff",  # undecodable
        frame(3, FAIL_KEY),
        frame(4, 4, preprocessing_id="stale"),
        frame(5, 5, top_k=5000),
        frame(6, 6),
    ]
    answers = [pb.StreamResponse.FromString(r) for r in s.raw.stream(iter(frames), timeout=30)]
    assert [a.WhichOneof("outcome") for a in answers[:5]] == [
        "classification",
        "error",
        "error",
        "error",
        "error",
    ]
    # The last frame likewise: answered, or failed only for sharing the failing frame's batch.
    last = answers[5]
    assert last.WhichOneof("outcome") == "classification" or POISON in last.error.message


def test_failed_and_rejected_work_is_freed_without_the_cyclic_collector(served: Server) -> None:
    refuse_fail_and_expire(served)  # once first: lazily built caches are not leaks
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(3):
            refuse_fail_and_expire(served)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    ours = [
        obj
        for obj in garbage
        if isinstance(obj, (BaseException, types.TracebackType, types.FrameType))
    ]
    assert ours == [], f"{len(ours)} objects in cycles, e.g. {ours[:5]}"
    serving = served.server.serving
    assert serving is not None
    assert serving.batcher.admitted_bytes == 0
