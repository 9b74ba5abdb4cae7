"""A sticky CUDA error in the TensorRT backend (on fake tensorrt/pycuda) seen from a real server:
calls get UNAVAILABLE with the reason, health turns NOT_SERVING, and serve() exits non-zero."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from framecast_client import Client, UnavailableError
from framecast_server import settings as server_settings
from framecast_server.backends.tensorrt import EngineSettings
from framecast_server.backends.tensorrt.backend import TensorRTBackend
from framecast_server.process import app
from framecast_server.process.background import BackgroundServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import make_settings, random_frames, wait_until

from .trt_fakes import STICKY, FakeDriver

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _backend(_: Path) -> TensorRTBackend:
    return TensorRTBackend(
        b"PLAN" + (8).to_bytes(4, "little"), EngineSettings(max_batch=8), device_name="Fake GPU"
    )


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        return int(reply.status)


def test_sticky_error_makes_calls_unavailable_and_health_not_serving(
    cache_dir: Path, fake_trt: Any, fake_driver: FakeDriver
) -> None:
    settings = make_settings(cache_dir, backend="null", max_batch=8)
    with (
        BackgroundServer(settings, backend_factory=_backend) as server,
        Client(server.address, timeout=30) as client,
    ):
        client.classify(random_frames(1)[0])
        assert _health(server.address) == SERVING
        fake_driver.fail_on["Stream.synchronize"] = STICKY
        with pytest.raises(UnavailableError, match="illegal memory access"):
            client.classify(random_frames(1)[0])
        fake_driver.fail_on.clear()
        with pytest.raises(UnavailableError, match="must restart"):
            client.classify(random_frames(1)[0])
        assert server.server.broken.is_set()
        assert _health(server.address) == NOT_SERVING


async def test_serve_exits_non_zero_when_the_backend_breaks(
    cache_dir: Path,
    tmp_path: Path,
    fake_trt: Any,
    fake_driver: FakeDriver,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(server_settings, "create_backend", lambda name, path, **_: _backend(path))
    port_file = tmp_path / "port"
    serving = asyncio.ensure_future(
        app.serve(make_settings(cache_dir, backend="tensorrt"), port_file=port_file)
    )
    # The port file is written once the server listens; the model loads after that.
    listening = "the server to listen"
    await asyncio.to_thread(wait_until, lambda: port_file.exists() or serving.done(), listening)
    assert not serving.done(), serving
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    await asyncio.to_thread(wait_until, lambda: _health(address) == SERVING, "SERVING")
    with Client(address, timeout=60) as client:
        fake_driver.fail_on["Stream.synchronize"] = STICKY
        # UNAVAILABLE with the reason; the client retries that, and by then the server may be
        # gone (it stops at once), so only the status is certain here. The reason is in the log.
        with pytest.raises(UnavailableError):
            await asyncio.to_thread(client.classify, random_frames(1)[0])
    assert await asyncio.wait_for(serving, 60) == app.EXIT_BACKEND_BROKEN == 3
    (exiting,) = [r for r in caplog.records if "exiting so that the server is restarted" in r.msg]
    assert "illegal memory access" in exiting.getMessage()
