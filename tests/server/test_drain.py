"""Drain on shutdown: NOT_SERVING (answerable) for the drain delay, then new calls refused,
calls in flight answered, streams ended so the SDK reconnects; fast exits; a second signal."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from framecast_bench import oip_codec as oip
from framecast_client import Client, UnavailableError, wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_oip._proto import open_inference_pb2 as oip_pb
from framecast_oip._proto import open_inference_pb2_grpc as oip_grpc
from framecast_server.process.background import BackgroundServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    RawClassifier,
    ServedHost,
    ServeProcess,
    in_process_only,
    make_settings,
    random_frames,
    serve_process,
    wait_until,
)

WAIT_S = 30.0
GRACE_S = 20.0
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def health(address: str) -> int | None:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.RpcError:
            return None
        return int(reply.status)


class Camera:
    """A raw stream that sends ``count`` frames, then stays open until told to end."""

    def __init__(self, raw: RawClassifier, count: int) -> None:
        self.end = threading.Event()
        self.answers: list[pb.StreamResponse] = []
        self.error: grpc.RpcError | None = None
        self._count = count
        self._call = raw.stream(self._frames(), timeout=60)

    def _frames(self) -> Iterator[bytes]:
        for i in range(self._count):
            image = wire.image_to_proto(random_frames(1, seed=i)[0])
            yield pb.StreamRequest(frame_id=i + 1, image=image).SerializeToString()
        self.end.wait(WAIT_S)

    def read(self) -> Camera:
        try:
            for raw in self._call:
                self.answers.append(pb.StreamResponse.FromString(raw))
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.end.set()
        return self


def test_a_drain_answers_calls_in_flight_ends_streams_and_refuses_new_calls(
    start_host: Callable[..., ServedHost],
) -> None:
    # Against `--workers 2 --inference shared` the drain is SIGTERM to the supervisor: the
    # front ends drain first (the inference process answers what they admitted), then it stops.
    host = start_host(grace_s=GRACE_S)
    with Client(host.address, timeout=WAIT_S) as client, ThreadPoolExecutor(4) as pool:
        raw = RawClassifier(host.address)
        host.hold()
        in_flight = pool.submit(client.classify_preprocessed, random_frames(1))
        assert host.wait_entered(WAIT_S)
        camera = Camera(raw, count=3)
        reading = pool.submit(camera.read)
        wait_until(lambda: host.queued() == 3, "the stream's frames never queued")
        started = time.monotonic()
        host.drain()
        wait_until(host.draining, "the drain never began")
        assert health(host.address) == NOT_SERVING  # still answering on the port
        # New calls are served until none arrived for a moment (clients that watch health
        # have gone elsewhere by then), and refused from then on.
        wait_until(host.refusing, "new calls to be refused")
        with pytest.raises(UnavailableError, match="shutting down"):
            client.classify_preprocessed(random_frames(1))
        host.release()
        assert len(in_flight.result(WAIT_S)) == 1
        reading.result(WAIT_S)
        assert [a.frame_id for a in camera.answers] == [1, 2, 3]
        assert all(a.HasField("classification") for a in camera.answers)
        assert camera.error is not None
        assert camera.error.code() is grpc.StatusCode.UNAVAILABLE  # the SDK reconnects
        host.wait_stopped(WAIT_S)
        assert time.monotonic() - started < GRACE_S / 2
        raw.close()


class OipCamera:
    """An Open Inference Protocol stream (ModelStreamInfer) that sends ``count`` requests, then
    stays open until told to end."""

    def __init__(self, channel: grpc.Channel, count: int) -> None:
        self.end = threading.Event()
        self.answers: list[oip_pb.ModelStreamInferResponse] = []
        self.error: grpc.RpcError | None = None
        self._count = count
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        self._call = stub.ModelStreamInfer(self._requests(), timeout=60)

    def _requests(self) -> Iterator[oip_pb.ModelInferRequest]:
        for i in range(self._count):
            frame = random_frames(1, seed=i)
            yield oip.infer_request(frame, model_name="resnet50", request_id=str(i + 1))
        self.end.wait(WAIT_S)

    def read(self) -> OipCamera:
        try:
            self.answers.extend(self._call)
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.end.set()
        return self


def test_a_drain_ends_an_open_inference_protocol_stream_as_ours(
    start_host: Callable[..., ServedHost],
) -> None:
    # ModelStreamInfer drains as ClassifyStream: what it read is answered, then UNAVAILABLE
    # (reconnect), at once rather than at the end of the grace period.
    host = start_host(grace_s=GRACE_S)
    with (
        Client(host.address, timeout=WAIT_S) as client,
        grpc.insecure_channel(host.address) as channel,
        ThreadPoolExecutor(4) as pool,
    ):
        host.hold()
        in_flight = pool.submit(client.classify_preprocessed, random_frames(1))
        assert host.wait_entered(WAIT_S)
        camera = OipCamera(channel, count=3)
        reading = pool.submit(camera.read)
        wait_until(lambda: host.queued() == 3, "the stream's requests never queued")
        started = time.monotonic()
        host.drain()
        wait_until(host.draining, "the drain never began")
        host.release()
        assert len(in_flight.result(WAIT_S)) == 1
        reading.result(WAIT_S)
        assert [a.infer_response.id for a in camera.answers] == ["1", "2", "3"]
        assert [a.error_message for a in camera.answers] == ["", "", ""]
        assert camera.error is not None
        assert camera.error.code() is grpc.StatusCode.UNAVAILABLE  # clients reconnect
        assert "shutting down" in (camera.error.details() or "")
        host.wait_stopped(WAIT_S)
        assert time.monotonic() - started < GRACE_S / 2


@in_process_only(
    "tells the drain delay from the drain by one server's gate; the delay is each front "
    "end's own (process/app.py), the same code with or without the shared inference process"
)
def test_the_drain_delay_keeps_serving_while_health_says_not_serving(cache_dir: Path) -> None:
    settings = make_settings(cache_dir, backend="null", drain_delay_s=1.0)
    server = BackgroundServer(settings)
    with server, Client(server.address, timeout=WAIT_S) as client, ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        stopping = pool.submit(server.close)
        wait_until(lambda: health(server.address) == NOT_SERVING, "never NOT_SERVING")
        assert not server.server.gate.draining
        assert len(client.classify_preprocessed(random_frames(1))) == 1
        stopping.result(WAIT_S)
        assert time.monotonic() - started >= settings.drain_delay_s


@pytest.fixture
def serve_null(cache_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Starts `framecast serve` processes with extra flags, SERVING; stops what is left."""
    with contextlib.ExitStack() as stack:

        def start(*flags: str) -> ServeProcess:
            words = ["serve", "--port", "0", "--backend", "null", "--offline",
                     "--cache-dir", str(cache_dir), *flags]  # fmt: skip
            server = stack.enter_context(serve_process(tmp_path, *words))
            wait_until(lambda: health(server.address) == SERVING, "SERVING", seen=server.tail)
            return server

        yield start


def test_sigterm_with_a_stream_open_ends_it_and_exits_at_once(
    serve_null: Callable[..., ServeProcess],
) -> None:
    server = serve_null()
    raw = RawClassifier(server.address)
    camera = Camera(raw, count=1)
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(camera.read)
        wait_until(lambda: len(camera.answers) == 1, "the frame was never answered")
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=WAIT_S) == 0
        elapsed = time.monotonic() - started
        reading.result(WAIT_S)
    assert elapsed < 3.0  # the grace period is 10 s; nothing was left to wait for
    assert camera.error is not None
    assert camera.error.code() is grpc.StatusCode.UNAVAILABLE
    raw.close()


def test_a_second_signal_exits_at_once(serve_null: Callable[..., ServeProcess]) -> None:
    server = serve_null("--drain-delay-s", "60")
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: health(server.address) == NOT_SERVING, "never NOT_SERVING")
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=WAIT_S) == 1
    assert time.monotonic() - started < 5.0
