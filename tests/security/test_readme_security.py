"""The README's Security and Metrics sections: their commands and examples run here."""

from __future__ import annotations

import re
import shlex
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from framecast_client.cli import main
from framecast_server.settings import ServerTLS
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from support import running_server, serve_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.index("\n## ", start + 1)
    return README[start:end]


SECURITY = section("Security")
METRICS = section("Metrics")


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def commands(text: str) -> list[list[str]]:
    """The `$ uv run framecast ...` lines of the console blocks, as argv after `framecast`."""
    found = []
    for block in blocks(text, "console"):
        for line in block.splitlines():
            if line.startswith("$ uv run framecast "):
                argv = shlex.split(line.removeprefix("$ uv run framecast ").split("#")[0])
                found.append(argv)
    return found


@pytest.fixture
def readme_certificates(tmp_path: Path) -> Path:
    """The CA, server and camera certificates, made by the README's own openssl commands."""
    (make,) = blocks(SECURITY, "sh")
    assert "openssl" in make
    subprocess.run(["sh", "-e", "-c", make], cwd=tmp_path, check=True, capture_output=True)
    for name in ("ca.pem", "server.pem", "server.key", "camera.pem", "camera.key"):
        assert (tmp_path / name).is_file(), name
    return tmp_path


def test_the_tls_example_runs_with_mutual_tls_and_a_token(
    cache_dir: Path,
    readme_certificates: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (code,) = [block for block in blocks(SECURITY, "python") if "TLS(" in block]
    tokens = tmp_path / "tokens"
    tokens.write_text("camera-7:readme-token\n")
    made = readme_certificates
    tls = ServerTLS(cert=made / "server.pem", key=made / "server.key", client_ca=made / "ca.pem")
    monkeypatch.chdir(made)
    Image.new("RGB", (640, 480), (120, 120, 110)).save("elephant.jpg")
    monkeypatch.setenv("FRAMECAST_TOKEN", "readme-token")
    with running_server(cache_dir, tls=tls, auth_tokens=tokens) as server:
        exec(compile(code.replace("framecast.example:50051", server.address), "README", "exec"))
    assert capsys.readouterr().out.strip()


def _serving(address: str, credentials: grpc.ChannelCredentials) -> bool:
    try:
        with grpc.secure_channel(address, credentials) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


def test_the_tls_commands_run(
    cache_dir: Path,
    readme_certificates: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    serve, classify = commands(SECURITY)
    assert serve[0] == "serve"
    assert classify[0] == "classify"
    monkeypatch.chdir(readme_certificates)
    Image.new("RGB", (320, 240), (20, 90, 200)).save("cat.jpg")
    # The README's command as shown, on a free port, with the test's model and cache.
    test_flags = ["--port", "0", "--backend", "null", "--offline", "--cache-dir", str(cache_dir)]
    with serve_process(tmp_path, *serve, *test_flags) as server:
        address = server.address
        credentials = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes())
        wait_until(lambda: _serving(address, credentials), "SERVING", seen=server.tail)
        capsys.readouterr()
        argv = [address if arg == "framecast.example:50051" else arg for arg in classify]
        assert main(argv) == 0
        assert "cat.jpg" in capsys.readouterr().out
        server.process.terminate()
        assert server.process.wait(timeout=60) == 0, server.tail()


def test_the_metrics_scrape_and_every_documented_metric_exists(cache_dir: Path) -> None:
    (serve, *_) = commands(METRICS)
    assert serve[:2] == ["serve", "--metrics-port"]
    (curl,) = [line for line in blocks(METRICS, "console")[0].splitlines() if "curl" in line]
    wanted = curl.split("grep ")[1].strip().lstrip("^")
    with running_server(cache_dir, metrics_port=0) as server:
        from framecast_client import Client
        from support import random_frames

        with Client(server.address, timeout=30) as client:
            client.classify_preprocessed(random_frames(1))
        url = f"http://localhost:{server.server.wiring.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as reply:
            text = reply.read().decode()
    assert any(line.startswith(wanted) for line in text.splitlines())
    exported = set(re.findall(r"^# TYPE (\S+)", text, flags=re.M))
    documented = set(re.findall(r"`((?:framecast|process)_[a-z0-9_]+)", METRICS))
    # The alert rules, dashboard and adapter name exported series: tests/metrics checks those
    # files. The names the adapter serves (its rules' `as:`) are Prometheus', not the server's.
    adapter = (ROOT / "deploy/kubernetes/prometheus-adapter/values.yaml").read_text()
    served_by_adapter = set(re.findall(r"as:\s*\"?(framecast_[a-z0-9_]+)", adapter))
    assert served_by_adapter, "the adapter's rule names no metric"
    gpu = {name for name in documented if name.startswith("framecast_gpu_")}
    for name in documented - gpu - served_by_adapter:
        if name == "process_":
            continue
        family = re.sub(r"_(total|bucket)$", "", name)
        assert family in exported or name in exported, f"{name} is documented, not exported"
    undocumented = {
        name
        for name in exported
        if name.startswith("framecast_")
        and not name.endswith("_created")  # prometheus_client's creation timestamps
        and not any(d.startswith(name) for d in documented)
    }
    assert not undocumented, undocumented
