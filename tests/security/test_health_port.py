"""--health-port: a plaintext port with grpc.health.v1 only, beside a TLS port with tokens."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from certs import Certificates
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_server.process.background import BackgroundServer
from framecast_server.settings import ServerTLS
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import make_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_health_port_answers_health_in_plaintext_and_nothing_else(
    cache_dir: Path, certificates: Certificates, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("camera:s3cret\n")
    health_port = free_port()
    settings = make_settings(
        cache_dir,
        backend="null",
        tls=ServerTLS(cert=certificates.server.cert, key=certificates.server.key),
        auth_tokens=tokens,
        auth_health=True,
        health_port=health_port,
    )
    with BackgroundServer(settings) as server:
        assert server.server.wiring.health_port == health_port
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # No token, no TLS: the probe's view (the main port would refuse both).
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == SERVING
            with pytest.raises(grpc.RpcError) as refused:
                pb_grpc.ClassifierStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # The main port is TLS: a plaintext health check there gets no answer.
            with grpc.insecure_channel(server.address) as plain:
                with pytest.raises(grpc.RpcError) as refused:
                    health_pb2_grpc.HealthStub(plain).Check(
                        health_pb2.HealthCheckRequest(), timeout=5
                    )
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # Draining: the health port says NOT_SERVING too (same state as the main port).
            server.run(server.server._health.enter_graceful_shutdown())
            assert next(watch).status == NOT_SERVING
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == NOT_SERVING
            watch.cancel()
    # Stopped with the server.
    with socket.socket() as again:
        again.bind(("127.0.0.1", health_port))


def test_the_flags_reach_the_settings_and_a_port_clash_is_one_line(tmp_path: Path) -> None:
    from framecast_client.cli import build_parser
    from framecast_server.cli_settings import settings_from_flags

    flags = ["--health-port", "8081", "--max-connection-age", "30"]
    args = build_parser().parse_args(["serve", *flags, "--max-connection-age-grace", "5"])
    settings = settings_from_flags(args)
    assert settings.health_port == 8081
    assert (settings.max_connection_age_s, settings.max_connection_age_grace_s) == (30.0, 5.0)
    defaults = settings_from_flags(build_parser().parse_args(["serve"]))
    assert defaults.health_port is None
    assert defaults.max_connection_age_s == 0  # off unless asked (the manifests ask)
    done = subprocess.run(
        [sys.executable, "-m", "framecast_client.cli", "serve", "--port", "50551",
         "--health-port", "50551", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    (line,) = done.stderr.strip().splitlines()
    assert line == "framecast serve: health port must differ from the port (50551)"
