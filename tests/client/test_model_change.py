"""A server restarted with a model that wants other preprocessing, under a running client.

The first server serves the default preset (shorter side to 232, center crop); the second, on
the same port, the caffe preset (stretch). Each test frame is wide, with a band of value ``a``
on its left and ``b`` elsewhere: the center crop's first pixel is ``b``, the stretch's is ``a``.
The NullBackend's top class is that first pixel, so every result tells which preprocessing its
frame got. A frame prepared for the first server and answered by the second would come back as
``b`` (a server that did not check) or as an error (this one checks): both fail these tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from framecast_client import (
    AsyncClient,
    AsyncStreamSession,
    Backoff,
    Client,
    PreprocessingChangedError,
    StreamResult,
    StreamSession,
    wire,
)
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.preprocess import PreprocessSpec
from framecast_client.streaming import make_stream_config
from framecast_client.streaming.drive import Drive, Stop
from framecast_client.streaming.pipeline import StreamCore
from framecast_client.wire_format import WireFormatError
from framecast_server.model.prepare import ModelSource
from framecast_server.model.presets import CAFFE, TORCHVISION
from framecast_server.process.background import BackgroundServer
from framecast_server.service.codecs import results
from numpy.typing import NDArray
from support import HoldableNullBackend, make_settings

TIMEOUT_S = 60.0
BAND = 64  # the left band's width, of 448: outside the default preset's center crop


def banded_frame(i: int) -> NDArray[np.uint8]:
    frame = np.full((224, 448, 3), band_keys(i)[1], dtype=np.uint8)
    frame[:, :BAND] = band_keys(i)[0]
    return frame


def band_keys(i: int) -> tuple[int, int]:
    """(a, b) of frame i: the class under stretch, the class under center crop."""
    return i % 100, 100 + i % 100


def top_class(result: StreamResult) -> int:
    return result.classification.top.index


def first_server(cache_dir: Path, backend: HoldableNullBackend | None = None) -> BackgroundServer:
    settings = make_settings(cache_dir, backend="null", max_batch=32)
    if backend is None:
        return BackgroundServer(settings)
    return BackgroundServer(settings, backend_factory=lambda _path: backend)


def caffe_server(cache_dir: Path, port: int) -> BackgroundServer:
    settings = make_settings(
        cache_dir, backend="null", max_batch=32, port=port, model=ModelSource(preset="caffe")
    )
    return BackgroundServer(settings)


def test_the_two_presets_have_different_preprocessing_ids(cache_dir: Path) -> None:
    with first_server(cache_dir) as first, Client(first.address) as client:
        default = client.model_info()
    with caffe_server(cache_dir, 0) as second, Client(second.address) as client:
        caffe = client.model_info()
    assert default.preprocessing != caffe.preprocessing
    assert default.preprocessing_id
    assert caffe.preprocessing_id
    assert default.preprocessing_id != caffe.preprocessing_id


def test_the_preprocessing_id_covers_what_the_client_does_to_the_pixels() -> None:
    torchvision = results.preprocessing_to_proto(TORCHVISION)
    caffe_numerics = dataclasses.replace(
        TORCHVISION, name="caffe", channel_order="BGR", mean=CAFFE.mean, std=CAFFE.std
    )
    other = results.preprocessing_to_proto(caffe_numerics)
    assert other.normalization != torchvision.normalization
    # Normalization happens in the server's engine: the same images serve both.
    assert results.preprocessing_id(torchvision) == results.preprocessing_id(other)
    stretched = results.preprocessing_to_proto(
        dataclasses.replace(TORCHVISION, resize_policy="stretch", resize_size=224)
    )
    assert results.preprocessing_id(stretched) != results.preprocessing_id(torchvision)


def test_images_stated_for_other_preprocessing_are_refused(cache_dir: Path) -> None:
    with first_server(cache_dir) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        served = stub.GetModelInfo(pb.GetModelInfoRequest()).preprocessing_id
        image = np.zeros((1, 224, 224, 3), dtype=np.uint8)
        request = pb.ClassifyRequest.FromString(
            wire.classify_request_bytes(image, top_k=1, preprocessing_id="0123456789abcdef")
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(request)
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        details = refused.value.details() or ""
        assert "0123456789abcdef" in details
        assert served in details
        # Stated right, or not stated at all (raw clients): served.
        for stated in (served, ""):
            request = pb.ClassifyRequest.FromString(
                wire.classify_request_bytes(image, top_k=1, preprocessing_id=stated)
            )
            assert len(stub.Classify(request).results) == 1

        # In a stream only the frame fails; the frames around it are answered.
        def frames() -> Iterator[pb.StreamRequest]:
            for frame_id, stated in enumerate((served, "0123456789abcdef", "")):
                yield pb.StreamRequest(
                    frame_id=frame_id, image=wire.image_to_proto(image[0]), preprocessing_id=stated
                )

        answers = list(stub.ClassifyStream(frames()))
        assert [a.frame_id for a in answers] == [0, 1, 2]
        assert [a.WhichOneof("outcome") for a in answers] == [
            "classification",
            "error",
            "classification",
        ]
        assert answers[1].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def test_classify_follows_a_server_restarted_with_other_preprocessing(cache_dir: Path) -> None:
    first = first_server(cache_dir).__enter__()
    port = first.port
    second: BackgroundServer | None = None
    try:
        with Client(first.address) as client, Client(first.address) as other:
            stale = other.preprocess(banded_frame(1))  # `other` holds the first model's info
            assert client.classify(banded_frame(1), top_k=1).top.index == band_keys(1)[1]
            first.close(grace=0)
            second = caffe_server(cache_dir, port).__enter__()
            # `client` still holds the first server's model info: classify finds out, reads it
            # again and prepares the image anew (stretch), by itself.
            assert client.classify(banded_frame(2), top_k=1).top.index == band_keys(2)[0]
            assert client.model_info().preprocessing.resize_policy == "stretch"
            # Images a caller prepared for the old model are refused, not misread...
            with pytest.raises(PreprocessingChangedError, match="GetModelInfo"):
                other.classify_preprocessed(stale[None], top_k=1)
            # ...and what the error says to do works.
            other.model_info(refresh=True)
            fresh = other.preprocess(banded_frame(1))
            assert other.classify_preprocessed(fresh[None], top_k=1)[0].top.index == band_keys(1)[0]
    finally:
        first.close(grace=0)
        if second is not None:
            second.close(grace=0)


def check_switch(results: list[StreamResult], answered_by_first: int) -> None:
    """Results the first server gave are center crops (b), the second server's stretches (a)."""
    before, after = results[:answered_by_first], results[answered_by_first:]
    assert [top_class(r) for r in before] == [band_keys(r.index)[1] for r in before]
    assert [top_class(r) for r in after] == [band_keys(r.index)[0] for r in after]


class CaffeRestart:
    """Once ``reached`` is set: stop the first server, note how many answers the session had
    by then (all the first server's), and start the caffe server on the same port; in a thread.

    With a held backend, a frame is first stuck in the first server, so that it dies with
    frames in flight for sure.
    """

    def __init__(
        self,
        first: BackgroundServer,
        cache_dir: Path,
        stream_broke: threading.Event,
        held: HoldableNullBackend | None = None,
    ) -> None:
        self.reached = threading.Event()
        self.answered_by_first = -1
        self.failures: list[BaseException] = []
        self._first, self._cache_dir, self._broke, self._held = first, cache_dir, stream_broke, held
        self._second: list[BackgroundServer] = []
        self._session: StreamSession | AsyncStreamSession | None = None
        self._thread = threading.Thread(target=self._run)

    def start(self, session: StreamSession | AsyncStreamSession) -> None:
        self._session = session
        self._thread.start()

    def _run(self) -> None:
        try:
            assert self.reached.wait(TIMEOUT_S)
            if self._held is not None:
                self._held.hold()
                assert self._held.entered.wait(TIMEOUT_S)
            port = self._first.port
            killer = threading.Thread(target=self._first.close, kwargs={"grace": 0})
            killer.start()
            assert self._broke.wait(TIMEOUT_S)
            assert self._session is not None
            self.answered_by_first = self._session.stats.received
            self._release()
            killer.join(TIMEOUT_S)
            self._second.append(caffe_server(self._cache_dir, port).__enter__())
        except BaseException as exc:
            self.failures.append(exc)
            self._release()

    def _release(self) -> None:
        if self._held is not None:
            self._held.release()

    def finish(self) -> None:
        self.reached.set()
        self._release()
        if self._thread.is_alive():
            self._thread.join(TIMEOUT_S)
        self._first.close(grace=0)
        for server in self._second:
            server.close(grace=0)
        assert not self.failures


def test_lossless_stream_prepares_its_frames_again_for_the_restarted_server(
    cache_dir: Path, stream_broke: threading.Event
) -> None:
    count = 60
    backend = HoldableNullBackend()
    first = first_server(cache_dir, backend).__enter__()
    # The frame stuck in the dying server was prepared for it: it must be resent prepared
    # again. So must the frames prepared meanwhile and not yet sent.
    restart = CaffeRestart(first, cache_dir, stream_broke, held=backend)
    results: list[StreamResult] = []
    try:
        with Client(first.address) as client:
            frames = (banded_frame(i) for i in range(count))
            backoff = Backoff(initial_s=0.05, max_s=0.5, give_up_after_s=TIMEOUT_S)
            with client.stream(frames, top_k=1, mode="lossless", backoff=backoff) as session:
                restart.start(session)
                for result in session:
                    results.append(result)
                    if result.index == 9:
                        restart.reached.set()
                stats = session.stats
    finally:
        restart.finish()
    assert [r.index for r in results] == list(range(count))
    check_switch(results, restart.answered_by_first)
    assert restart.answered_by_first < count
    assert stats.resent >= 1
    assert stats.errors == stats.dropped == 0


def test_realtime_stream_switches_to_the_restarted_servers_preprocessing(
    cache_dir: Path, stream_broke: threading.Event
) -> None:
    first = first_server(cache_dir).__enter__()
    restart = CaffeRestart(first, cache_dir, stream_broke)
    stop = threading.Event()

    def camera() -> Iterator[NDArray[np.uint8]]:
        i = 0
        while not stop.wait(0.005):
            yield banded_frame(i)
            i += 1

    results: list[StreamResult] = []
    try:
        with Client(first.address) as client:
            backoff = Backoff(initial_s=0.05, max_s=0.5, give_up_after_s=TIMEOUT_S)
            with client.stream(camera(), top_k=1, mode="realtime", backoff=backoff) as session:
                restart.start(session)
                for result in session:
                    results.append(result)
                    if len(results) == 10:
                        restart.reached.set()
                    if restart.failures or 0 <= restart.answered_by_first <= len(results) - 20:
                        break
                stats = session.stats
    finally:
        stop.set()
        restart.finish()
    check_switch(results, restart.answered_by_first)
    assert stats.errors == 0
    assert stats.reconnects >= 1


async def test_async_stream_prepares_its_frames_again_for_the_restarted_server(
    cache_dir: Path, stream_broke: threading.Event
) -> None:
    count = 40
    first = first_server(cache_dir)
    await asyncio.to_thread(first.__enter__)
    restart = CaffeRestart(first, cache_dir, stream_broke)
    results: list[StreamResult] = []
    try:
        async with AsyncClient(first.address) as client:
            frames = (banded_frame(i) for i in range(count))
            backoff = Backoff(initial_s=0.05, max_s=0.5, give_up_after_s=TIMEOUT_S)
            async with client.stream(frames, top_k=1, mode="lossless", backoff=backoff) as session:
                restart.start(session)
                # Results are taken all along: a consumer that stopped taking them would stop
                # the session reading answers, and so from noticing the break.
                async for result in session:
                    results.append(result)
                    if result.index == 9:
                        restart.reached.set()
                stats = session.stats
    finally:
        await asyncio.to_thread(restart.finish)
    assert [r.index for r in results] == list(range(count))
    check_switch(results, restart.answered_by_first)
    assert stats.errors == stats.dropped == 0


def test_a_preprocessing_this_client_does_not_know_ends_the_session_with_the_reason() -> None:
    config = make_stream_config(
        address="127.0.0.1:1",
        credentials=None,
        channel_options=(),
        spec=PreprocessSpec(),
        preprocessing_id="old",
        channel_order="RGB",
        num_classes=1000,
        top_k=1,
        max_in_flight=None,
        mode="lossless",
        reconnect=True,
        backoff=None,
    )
    core = StreamCore(config)
    # A resize policy added to the protocol after this client was written.
    unknown = pb.ResizePolicy.ValueType(99)
    newer = pb.ModelInfo(
        preprocessing=pb.Preprocessing(resize_policy=unknown), preprocessing_id="new"
    )
    assert Drive(core).info_answered(newer) == Stop()
    with core.lock:
        failure = core.pop_locked()
    assert isinstance(failure, WireFormatError)
    assert "upgrade framecast-client" in str(failure)
