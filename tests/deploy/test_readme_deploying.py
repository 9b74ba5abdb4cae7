"""Every command of README's "Deploying" section is one the tests run, or runs here.

Commands that need what our machines lack (a Docker engine, a cluster) are checked to name the
files the other tests in tests/deploy build, render and validate.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SECTION = README.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]
COMMANDS = [
    line.split("  #", 1)[0].strip()
    for block in re.findall(r"```sh\n(.*?)```", SECTION, flags=re.S)
    for line in block.splitlines()
    if line.strip()
]
OVERLAYS = {f"deploy/kubernetes/overlays/{name}" for name in ("cpu", "gpu", "secure")}
UV_RUN = ["python3", "-m", "uv", "run"]


def test_the_section_has_its_four_parts() -> None:
    for part in ("### One host, all its cores", "### Docker", "### Kubernetes", "### KServe"):
        assert part in SECTION
    assert len(COMMANDS) >= 6


def health(address: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
    except grpc.RpcError:
        return None


def serve(words: list[str], cache_dir: Path, tmp_path: Path) -> None:
    """`framecast serve ...` as shown, on loopback and a free port, offline, null backend."""
    # First the command exactly as shown: its flags must be accepted as they stand (a bare
    # --host 0.0.0.0 is refused without TLS or --insecure), short of binding the address.
    from framecast_client.cli import build_parser
    from framecast_server.cli_settings import settings_from_flags

    settings_from_flags(build_parser().parse_args(words[1:]))
    port_file = tmp_path / "port"
    overrides = ["--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                 "--backend", "null", "--offline", "--cache-dir", str(cache_dir)]  # fmt: skip
    command = [sys.executable, "-m", "framecast_client.cli", *words[1:], *overrides]
    process = subprocess.Popen(command)
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists():
            assert process.poll() is None, f"{shlex.join(words)} exited"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        assert health(address) == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_the_command_runs_or_names_what_the_tests_check(
    command: str, cache_dir: Path, tmp_path: Path
) -> None:
    words = shlex.split(command)
    if words[:4] == UV_RUN:
        words = words[4:]
        if words[0] == "framecast" and words[1] == "serve":
            serve(words, cache_dir, tmp_path)
            return
        if words[0] == "python":
            done = subprocess.run([sys.executable, *words[1:]], cwd=ROOT, timeout=300)
            assert done.returncode == 0
            return
    elif words[:2] == ["kubectl", "kustomize"]:
        if shutil.which("kubectl") is None:
            pytest.skip("kubectl is not installed")
        assert words[2] in OVERLAYS
        done = subprocess.run(words, cwd=ROOT, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return
    elif words[:2] == ["kubectl", "apply"]:
        # No cluster here: what it applies is what test_kubernetes renders and validates.
        assert (words[2], words[3]) in {("-k", o) for o in OVERLAYS} | {
            ("-f", "deploy/kserve/inferenceservice.yaml")
        }
        return
    elif words[:3] == ["kubectl", "create", "secret"]:
        # No cluster here: the Secret and its keys are the ones the secure overlay mounts
        # (test_kubernetes checks that its arguments name those files).
        kind, name = words[3], words[4]
        secure = (ROOT / "deploy" / "kubernetes" / "components" / "secure").glob("*.yaml")
        assert any(f"secretName: {name}" in f.read_text() for f in secure)
        if kind == "tls":  # kubernetes.io/tls: the keys tls.crt and tls.key
            assert name == "framecast-tls"
            assert {w.split("=")[0] for w in words[5:]} == {"--cert", "--key"}
        else:
            assert (kind, name) == ("generic", "framecast-tokens")
            assert words[5].startswith("--from-file=tokens=")
        return
    elif words[:2] == ["docker", "build"]:
        # No Docker engine here: test_images runs this Dockerfile's steps.
        assert words[words.index("-f") + 1] == "deploy/cpu.Dockerfile"
        assert words[-1] == "."
        return
    elif words[:2] == ["docker", "run"]:
        assert "framecast-cache:/var/cache/framecast" in words  # the image's VOLUME
        # The image's CMD port, published on this host's loopback only (it is plaintext);
        # test_manifest_args runs the CMD unchanged.
        assert "127.0.0.1:50051:50051" in words
        built = next(c for c in COMMANDS if c.startswith("docker build"))
        assert words[-1] == shlex.split(built)[shlex.split(built).index("-t") + 1]
        return
    pytest.fail(f"README shows a command no test runs: {command}")
