"""A frame's walk through Classify and ModelInfer stays inside the server package.

Recorded, not inferred from imports: every Python function that runs on the server's threads
while it answers real calls is noted, and none may come from the client distribution but the
wire format both ends share (the generated messages and ``framecast_client.wire_format``).
The calls are sent as prepared bytes over a bare channel, so no client code runs for them.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import framecast_client
import framecast_server
import grpc
from framecast_bench import oip_codec
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_oip._proto import open_inference_pb2 as oip_pb
from framecast_server.process.background import BackgroundServer
from support import make_settings, random_frames

CLIENT = Path(framecast_client.__file__).parent
SERVER = Path(framecast_server.__file__).parent
SHARED = (CLIENT / "wire_format.py", CLIENT / "_proto")


class Walk:
    """The source files of the Python functions called on the server's threads while on."""

    def __init__(self) -> None:
        self.on = False
        self.files: set[str] = set()
        self._main = threading.get_ident()

    def hook(self, frame: FrameType, event: str, arg: Any) -> None:
        if self.on and event == "call" and threading.get_ident() != self._main:
            self.files.add(frame.f_code.co_filename)

    def in_package(self, root: Path) -> set[Path]:
        return {Path(f) for f in self.files if Path(f).is_relative_to(root)}


@contextmanager
def recorded_server(cache_dir: Path, walk: Walk) -> Iterator[BackgroundServer]:
    # Set before the server starts: its event loop and inference threads inherit the hook.
    threading.setprofile(walk.hook)
    try:
        with BackgroundServer(make_settings(cache_dir, backend="null")) as server:
            yield server
    finally:
        threading.setprofile(None)
        sys.setprofile(None)


def test_classify_and_model_infer_never_step_into_the_client(cache_dir: Path) -> None:
    classify = wire.classify_request_bytes(random_frames(2), top_k=3)
    infer = oip_codec.infer_request(
        random_frames(2), model_name="resnet50", class_count=3
    ).SerializeToString()
    walk = Walk()
    with (
        recorded_server(cache_dir, walk) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        # Bytes in, bytes out: no serializers (grpc-stubs insist on them).
        classify_method, infer_method = (
            "/framecast.v1.Classifier/Classify",
            "/inference.GRPCInferenceService/ModelInfer",
        )
        call_classify = channel.unary_unary(classify_method)  # type: ignore[call-arg]
        call_infer = channel.unary_unary(infer_method)  # type: ignore[call-arg]
        # Once unrecorded: first calls import and cache lazily, which is not a frame's walk.
        call_classify(classify, timeout=30)
        call_infer(infer, timeout=30)
        walk.on = True
        classified = pb.ClassifyResponse.FromString(call_classify(classify, timeout=30))
        inferred = oip_pb.ModelInferResponse.FromString(call_infer(infer, timeout=30))
        walk.on = False
    assert [len(r.predictions) for r in classified.results] == [3, 3]
    assert len(oip_codec.classifications_from_response(inferred)) == 2
    # The walk was seen: servicers, codecs and the batcher ran on the recorded threads.
    server_files = {p.relative_to(SERVER).as_posix() for p in walk.in_package(SERVER)}
    assert {
        "service/classifier.py",
        "service/inference_protocol.py",
        "service/codecs/requests.py",
        "service/codecs/results.py",
        "service/codecs/tensors.py",
        "core/batcher.py",
        "core/batching/fair_queue.py",
        "core/batching/workers.py",
    } <= server_files, server_files
    stepped = {
        p for p in walk.in_package(CLIENT) if not any(p == s or p.is_relative_to(s) for s in SHARED)
    }
    assert not stepped, sorted(str(p.relative_to(CLIENT)) for p in stepped)
