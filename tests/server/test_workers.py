"""`framecast serve --workers N`: processes on one port; a crashed worker restarted; a drain."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from framecast_client import Client
from framecast_server.process.cores import (
    cgroup_cpu_limit,
    parse_workers,
    usable_cores,
    worker_settings,
)
from framecast_server.settings import ServerSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import fails_its_test_run, random_frames, wait_until

DEADLINE_S = 120.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_workers_is_a_count_or_auto() -> None:
    assert parse_workers("3") == 3
    assert parse_workers("auto") == usable_cores() >= 1
    for bad in ("0", "-2", "many", ""):
        with pytest.raises(ValueError, match="workers must be"):
            parse_workers(bad)


def test_each_worker_gets_its_share_of_the_cores_for_onnx_runtime() -> None:
    settings = worker_settings(ServerSettings(port=0), workers=2, port=1234)
    assert settings.port == 1234
    assert settings.threads == max(1, usable_cores() // 2)
    assert worker_settings(ServerSettings(threads=3), 2, 1).threads == 3  # told explicitly


def fake_cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "400000 100000\n"}, 4.0),  # cgroup v2, limits.cpu: 4
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        # cgroup v1: Docker and the kubelet mount the container's own cgroup here.
        (
            {
                "cpu,cpuacct/cpu.cfs_quota_us": "400000\n",
                "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            },
            4.0,
        ),
        ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_the_cpu_quota_is_read_from_cgroup_v2_or_v1(
    tmp_path: Path, files: dict[str, str], limit: float | None
) -> None:
    assert cgroup_cpu_limit(fake_cgroup(tmp_path, files)) == limit


def test_auto_is_capped_by_a_cgroup_v1_quota(tmp_path: Path) -> None:
    # A pod limited to 1 CPU on a bigger node: one worker, whatever the affinity says.
    root = fake_cgroup(
        tmp_path, {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    )
    assert usable_cores(root) == 1
    root = fake_cgroup(
        tmp_path / "big", {"cpu/cpu.cfs_quota_us": "9600000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    )
    assert usable_cores(root) == len(os.sched_getaffinity(0))  # never more than the affinity


@pytest.mark.parametrize("value", ["0", "lots"])
def test_a_bad_worker_count_is_one_line_of_usage(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "framecast_client.cli", "serve", "--workers", value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "workers must be" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "framecast_client.cli", "serve", "--workers", "2",
             "--port", str(port), "--backend", "null", "--offline"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    # One line, found before any worker starts, naming who holds the port.
    assert done.stderr.strip() == (
        f"framecast serve: port {port} on 127.0.0.1 is already in use by pid {os.getpid()} "
        f"({Path(f'/proc/{os.getpid()}/comm').read_text().strip()})"
    )


def test_workers_that_cannot_load_stop_the_host_instead_of_restarting(tmp_path: Path) -> None:
    # An ONNX graph shaped like a classifier (any other is refused before a worker starts)
    # that fails its test run: each worker fails to load it.
    broken = fails_its_test_run(tmp_path / "broken.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "framecast_client.cli", "serve", "--workers", "2", "--port", "0",
         "--onnx", str(broken), "--offline", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert "before serving; stopping" in done.stderr
    assert "restarting" not in done.stderr
    assert "Traceback" not in done.stderr


def workers_of(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    found = []
    for pid in children:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            continue  # it just ended
        if b"spawn_main" in cmdline:
            found.append(int(pid))
    return sorted(found)


def sockets_of(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:
            continue
    return count


def health(address: str) -> int | None:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
    except grpc.RpcError:
        return None
    return int(reply.status)


@pytest.fixture
def two_workers(
    cache_dir: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port_file = tmp_path / "port"
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "framecast_client.cli", "serve", "--workers", "2",
        "--port", "0", "--port-file", str(port_file),
        "--backend", "null", "--offline", "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stderr=sink, env={**os.environ, "PYTHONWARNINGS": "error"}
        )
    try:
        # The supervisor writes the port once every worker serves.
        wait_until(
            lambda: port_file.exists() or process.poll() is not None,
            "the port file",
            timeout_s=DEADLINE_S,
        )
        assert process.poll() is None, log.read_text()
        yield process, f"127.0.0.1:{port_file.read_text().strip()}", log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
def test_workers_share_the_port_restart_after_a_crash_and_drain_together(
    two_workers: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, address, log = two_workers
    first = workers_of(process.pid)
    assert len(first) == 2
    assert health(address) == SERVING

    # The kernel spreads connections over the workers: each holds some of sixteen. (Channels
    # of equal settings share one connection unless told otherwise.)
    before = {pid: sockets_of(pid) for pid in first}
    channels = [
        grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(16)
    ]
    try:
        for channel in channels:
            check = health_pb2_grpc.HealthStub(channel).Check
            assert check(health_pb2.HealthCheckRequest(), timeout=30).status == SERVING
        assert all(sockets_of(pid) > before[pid] for pid in first), before
    finally:
        for channel in channels:
            channel.close()

    # A crashed worker is restarted, and the restart is logged.
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(workers_of(process.pid)) == 2 and victim not in workers_of(process.pid),
               "the worker to be restarted", timeout_s=DEADLINE_S)  # fmt: skip
    # The supervisor logs the crash as it restarts the worker: wait for that line first (the
    # first start's "worker 0 serving" is in the log before it, so the split alone proves
    # nothing until the line is there).
    killed = f"(pid {victim}) was killed by SIGKILL; restarting"
    wait_until(lambda: killed in log.read_text(), "the crash to be logged", timeout_s=DEADLINE_S)
    wait_until(lambda: "worker 0 serving" in log.read_text().split(killed)[-1],
               "the new worker to serve", timeout_s=DEADLINE_S)  # fmt: skip
    for _ in range(8):  # new connections, whichever worker they reach
        with Client(address, timeout=30) as client:
            assert client.classify(random_frames(1)[0]).top.label

    # SIGTERM drains every worker and the supervisor exits 0.
    workers = workers_of(process.pid)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert "all workers stopped" in log.read_text()
