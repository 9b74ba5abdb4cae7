"""Server processes for the benchmarks: start one, wait until it serves, read its CPU and RSS.

One place for what every side-by-side benchmark needs from the processes it measures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from framecast_server.settings import ServerSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc


def connections_for(concurrency: int) -> int:
    """Connections that carry ``concurrency`` calls at once to a server on default limits.

    `framecast serve` runs a few calls at once per connection (the rest wait on the client);
    load generators spread theirs so that they measure the server, not their own queue.
    """
    return -(-concurrency // ServerSettings().max_streams_per_connection)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(root: int) -> float:
    """User plus system CPU time of a process and all its living descendants, from /proc."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(pid, 0.0) for pid in tree)


def serve_command(
    port_file: Path, cache_dir: Path, *flags: str, backend: str = "null", python: str = ""
) -> list[str]:
    """`framecast serve` on a free port (written to ``port_file``), offline, plus ``flags``.

    ``python``: the interpreter to run it (another checkout's, to compare); default this one.
    """
    return [
        python or sys.executable, "-m", "framecast_client.cli", "serve", "--port", "0",
        "--port-file", str(port_file), "--backend", backend, "--offline",
        "--cache-dir", str(cache_dir), *flags,
    ]  # fmt: skip


@contextmanager
def running(
    command: list[str], port_file: Path, log: Path | None = None
) -> Iterator[tuple[str, int]]:
    """Run a server command until the block ends; yields its address and pid once it listens.

    Waits only for the port file: the caller waits for whatever "ready" means on its side
    (a plain channel cannot tell when a TLS server is ready). Output goes to ``log`` or nowhere.
    """
    with log.open("wb") if log is not None else open(os.devnull, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text().strip().splitlines()[-3:] if log is not None else []
                raise RuntimeError(f"server did not start: {command} {' | '.join(tail)}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port_file.read_text().strip()}", process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_server(
    cache_dir: Path, port_file: Path, log: Path, *flags: str, python: str = ""
) -> subprocess.Popen[bytes]:
    """`framecast serve --backend null` on a free port; its output goes to ``log``."""
    command = serve_command(port_file, cache_dir, *flags, python=python)
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
    wait_health(address, alive=lambda: process.poll() is None)
    return address


def wait_health(address: str, *, alive: Callable[[], bool] = lambda: True) -> None:
    """Until the (plaintext) server at ``address`` says SERVING: its model is loaded."""
    deadline = time.monotonic() + 300
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {address} never became SERVING")
            time.sleep(0.05)
