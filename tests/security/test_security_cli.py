"""The security flags of `framecast`: secure by default, one-line refusals, a real TLS process."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from certs import Certificates
from framecast_client.cli import main
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from support import serve_process, wait_until

SERVE = ["serve", "--port", "0", "--backend", "null", "--offline"]


def _one_line_refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_serving_plaintext_beyond_loopback_needs_insecure(
    cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _one_line_refusal([*SERVE, "--host", "0.0.0.0", "--cache-dir", str(cache_dir)], capsys)
    assert err.startswith("framecast serve: refusing to serve plaintext on 0.0.0.0")
    assert "--tls-cert" in err
    assert "--insecure" in err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tls-cert", "server.pem"], "needs both --tls-cert and --tls-key"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "cannot read"),
        (["--auth-tokens", "missing-tokens.txt"], "cannot read the token file"),
        (["--workers", "2", "--auth-tokens", "missing-tokens.txt"], "cannot read the token file"),
    ],
)
def test_unusable_security_flags_are_one_line(
    flags: list[str],
    expected: str,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    err = _one_line_refusal([*SERVE, *flags, "--cache-dir", str(cache_dir)], capsys)
    assert expected in err


def test_client_refuses_a_token_in_plaintext_to_another_host_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64)).save(image)
    err = _one_line_refusal(
        ["classify", str(image), "--address", "192.0.2.10:50051", "--token", "t0ken"], capsys
    )
    assert "refusing to send a token in plaintext" in err


def _serving(address: str, credentials: grpc.ChannelCredentials) -> bool:
    try:
        with grpc.secure_channel(address, credentials) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def test_serve_with_tls_on_all_interfaces_and_classify_with_the_ca(
    cache_dir: Path,
    tmp_path: Path,
    certificates: Certificates,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("camera:cli-test-token\n")
    words = [
        *SERVE, "--host", "0.0.0.0", "--tls-cert", str(certificates.server.cert),
        "--tls-key", str(certificates.server.key), "--auth-tokens", str(tokens),
        "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    with serve_process(tmp_path, *words) as server:
        address = server.address
        credentials = grpc.ssl_channel_credentials(certificates.ca.cert.read_bytes())
        # Health needs no token.
        wait_until(lambda: _serving(address, credentials), "SERVING", seen=server.tail)
        image = tmp_path / "photo.jpg"
        Image.new("RGB", (320, 240), (200, 90, 30)).save(image)
        capsys.readouterr()
        secure = ["--address", address, "--tls-ca", str(certificates.ca.cert)]
        with monkeypatch.context() as env:
            env.setenv("FRAMECAST_TOKEN", "cli-test-token")
            assert main(["classify", str(image), *secure]) == 0
            assert str(image) in capsys.readouterr().out
        assert main(["classify", str(image), *secure]) == 1  # no token now
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["info", *secure, "--token", "cli-test-token"]) == 0
        server.process.terminate()
        assert server.process.wait(timeout=60) == 0, server.tail()


@pytest.mark.parametrize("command", [["stream", "synthetic:64x64@5"], ["bench"], ["info"]])
def test_every_client_command_takes_the_same_security_flags(command: list[str]) -> None:
    from framecast_client import TLS
    from framecast_client.cli import build_parser
    from framecast_client.security_cli import client_security

    flags = ["--tls-ca", "ca.pem", "--tls-server-name", "camera.test", "--token", "abc"]
    args = build_parser().parse_args([*command, *flags, "--insecure-token"])
    assert args.tls_ca == Path("ca.pem")
    assert args.tls_server_name == "camera.test"
    assert args.token == "abc"
    assert args.insecure_token
    assert client_security(args) == {
        "tls": TLS(ca=Path("ca.pem"), server_name="camera.test"),
        "token": "abc",
        "allow_insecure_token": True,
    }
