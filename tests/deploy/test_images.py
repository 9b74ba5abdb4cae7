"""The CPU image's steps, run here without Docker: its install commands into a fresh virtual
environment, then its command and its health check against the server that starts.

No image is built on our machines (no Docker engine), so a broken install step, a command the
CLI no longer takes or a health check that cannot pass would otherwise surface only at release.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
import venv
from pathlib import Path

import pytest
from support import write_downloaded_weights

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "cpu.Dockerfile"
GPU_DOCKERFILE = ROOT / "deploy" / "gpu.Dockerfile"
LIST_NAMES = "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'])"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    return [(i.split(None, 1)[0].upper(), i.split(None, 1)[1]) for i in joined]


def last(dockerfile: Path, name: str) -> str:
    return [args for instruction, args in instructions(dockerfile) if instruction == name][-1]


def test_the_image_is_slim_non_root_with_a_cache_volume_and_a_grpc_health_check() -> None:
    steps = instructions(DOCKERFILE)
    bases = [args for instruction, args in steps if instruction == "FROM"]
    assert all("-slim" in base for base in bases)
    assert last(DOCKERFILE, "USER").split(":")[0] not in ("0", "root")
    assert last(DOCKERFILE, "VOLUME") == "/var/cache/framecast"
    env = last(DOCKERFILE, "ENV")
    assert "FRAMECAST_CACHE_DIR=/var/cache/framecast" in env
    assert "framecast_server.healthcheck" in last(DOCKERFILE, "HEALTHCHECK")
    runs = [args for instruction, args in steps if instruction == "RUN"]
    assert any("deploy/install.sh /opt/framecast" in run for run in runs)


def test_the_gpu_image_is_the_gpu_hosts_file() -> None:
    # Written by the GPU-host work; the Kubernetes GPU overlay names the image built from it.
    if not GPU_DOCKERFILE.exists():
        pytest.skip("deploy/gpu.Dockerfile is not in this checkout yet")
    assert "tensorrt" in GPU_DOCKERFILE.read_text().lower()


def exec_form(arguments: str) -> list[str]:
    """A Dockerfile exec-form array (the JSON list after CMD, ENTRYPOINT or HEALTHCHECK CMD)."""
    parsed = json.loads(arguments[arguments.index("[") :])
    assert isinstance(parsed, list)
    return [str(a) for a in parsed]


@pytest.mark.slow
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_image_steps_install_serve_and_pass_the_health_check(tmp_path: Path) -> None:
    env_dir = tmp_path / "opt-framecast"
    venv.create(env_dir, with_pip=False)
    install = next(a for i, a in instructions(DOCKERFILE) if i == "RUN" and "install.sh" in a)
    # The RUN line's install step, word for word, with the image's path swapped for this one.
    command = install.split("&&")[-1].strip().replace("/opt/framecast", str(env_dir))
    subprocess.run(shlex.split(command), cwd=ROOT, check=True, timeout=900)

    bin_dir = env_dir / "bin"
    environment = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    # The image's volume, as its first start leaves it (the download played: no network here).
    volume = tmp_path / "volume"
    write_downloaded_weights(volume)
    environment["FRAMECAST_CACHE_DIR"] = str(volume)
    entrypoint = exec_form(last(DOCKERFILE, "ENTRYPOINT"))
    cmd = exec_form(last(DOCKERFILE, "CMD"))
    assert cmd[cmd.index("--port") + 1] == "50051"
    # The image's command (test_manifest_args runs it unchanged, in namespaces of its own);
    # here on loopback and free ports, one worker, with the null backend: what this test
    # proves is the install step.
    port_file = tmp_path / "port"
    health_port = free_port()
    overrides = ["--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file),
                 "--health-port", str(health_port), "--metrics-port", "0", "--workers", "1",
                 "--backend", "null"]  # fmt: skip
    server = subprocess.Popen([*entrypoint, *cmd, *overrides], env=environment)
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists():
            assert server.poll() is None, "the image's command exited"
            assert time.monotonic() < deadline, "the image's command never served"
            time.sleep(0.1)
        check = exec_form(last(DOCKERFILE, "HEALTHCHECK"))
        assert check[check.index("--port") + 1] == cmd[cmd.index("--health-port") + 1]
        check[check.index("--port") + 1] = str(health_port)
        # As Docker does: the check again until it passes (the model loads after the bind).
        while True:
            done = subprocess.run(check, env=environment, capture_output=True, text=True)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == "SERVING"
        # The image holds the server and the client, not the dev tools.
        names = subprocess.run(
            [bin_dir / "python", "-c", LIST_NAMES], capture_output=True, text=True, check=True
        ).stdout.split()
        assert {"framecast-server", "framecast-client", "onnxruntime"} <= set(names)
        assert not {"pytest", "mypy", "ruff", "kubernetes-validate"} & set(names)
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0
