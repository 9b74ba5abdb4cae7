"""A `framecast serve` process for the benchmarks: start it, wait until SERVING, read its RSS."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(
    cache_dir: Path, port_file: Path, log: Path, *flags: str
) -> subprocess.Popen[bytes]:
    """`framecast serve --backend null` on a free port; its output goes to ``log``."""
    command = [
        sys.executable, "-m", "framecast_client.cli", "serve", "--port", "0",
        "--port-file", str(port_file), "--backend", "null", "--offline",
        "--cache-dir", str(cache_dir), *flags,
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_serving(process: subprocess.Popen[bytes], port_file: Path) -> str:
    """Wait until the server says SERVING; returns its address."""
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    address = f"127.0.0.1:{port_file.read_text().strip()}"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return address
            except grpc.RpcError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server never became SERVING")
            time.sleep(0.05)
