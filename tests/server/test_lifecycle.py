"""Health, reflection and graceful shutdown, in-process and as a real process."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from framecast_client import Client, UnavailableError
from framecast_server.process.background import BackgroundServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import GatedBackend, random_frames, running_server, serve_process, wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def test_health_is_not_serving_until_the_model_is_loaded(cache_dir: Path) -> None:
    with running_server(cache_dir, backend="onnxruntime", load=False) as server:
        assert health_status(server.address) == NOT_SERVING
        assert health_status(server.address, "framecast.v1.Classifier") == NOT_SERVING
        with Client(server.address) as client, pytest.raises(UnavailableError, match="loading"):
            client.classify(random_frames(1)[0])
        server.load()
        assert health_status(server.address) == SERVING
        assert health_status(server.address, "framecast.v1.Classifier") == SERVING


def test_reflection_lists_the_services(onnx_server: BackgroundServer) -> None:
    with grpc.insecure_channel(onnx_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    names = {s.name for s in reply.list_services_response.service}
    assert {"framecast.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_graceful_stop_finishes_in_flight_calls_and_reports_not_serving(cache_dir: Path) -> None:
    backend = GatedBackend()
    backend.release.set()  # let the warm-up batch through
    with (
        running_server(cache_dir, backend_instance=backend) as server,
        Client(server.address, timeout=30) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        client.model_info()
        backend.release.clear()
        backend.entered.clear()
        in_flight = pool.submit(client.classify, random_frames(1)[0])
        assert backend.entered.wait(10)
        # Health watchers (load balancers) hear NOT_SERVING on the stream they already have;
        # new calls are refused once the server stops accepting.
        with grpc.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30
            )
            assert next(watch).status == SERVING
            stopping = pool.submit(server.close, 20.0)
            assert next(watch).status == NOT_SERVING
            watch.cancel()
        assert not in_flight.done()
        backend.release.set()
        assert len(in_flight.result(timeout=10).predictions) == 5
        stopping.result(timeout=30)


def health_status_or_none(address: str) -> int | None:
    try:
        return health_status(address)
    except grpc.RpcError:
        return None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_process_exits_zero_on_signal(
    sig: signal.Signals, cache_dir: Path, tmp_path: Path
) -> None:
    words = [
        "serve",
        "--port",
        "0",
        "--backend",
        "null",
        "--offline",
        "--cache-dir",
        str(cache_dir),
    ]
    with serve_process(tmp_path, *words) as server:
        wait_until(lambda: health_status_or_none(server.address) == SERVING, "SERVING",
                   seen=server.tail)  # fmt: skip
        with Client(server.address, timeout=30) as client:
            assert client.classify(random_frames(1)[0]).top.label
        server.process.send_signal(sig)
        assert server.process.wait(timeout=60) == 0, server.tail()
