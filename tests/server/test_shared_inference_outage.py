"""`serve --workers 2 --inference shared` under load, losing a process: nothing is lost that
should not be.

Real processes, signals and sockets: several unary callers (raw gRPC, no client retries, so what
the server answers is what they see) and lossless SDK streams run while the inference process
is SIGKILLed, then while a front end is. Each frame is keyed (the null backend classifies a
uniform frame as its pixel value), so an answer names the frame it belongs to.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from framecast_client import Classification, Client, wire
from framecast_client._proto import classifier_pb2 as pb
from numpy.typing import NDArray
from support import (
    INPUT_SIZE,
    NOT_SERVING,
    SERVING,
    RawClassifier,
    health_status,
    wait_until,
)

pytestmark = pytest.mark.slow

WAIT_S = 60.0  # a restart on a loaded 2-core machine takes seconds
STREAMS = 3
CALLERS = 3
FRAMES = 240  # per stream: about 2 s of a paced camera before the outage


def keyed(key: int) -> NDArray[np.uint8]:
    return np.full((INPUT_SIZE, INPUT_SIZE, 3), key, dtype=np.uint8)


def stream_key(stream: int, i: int) -> int:
    """The key of frame ``i`` of stream ``stream``: each stream's run of keys starts at its
    own offset, so an answer given to the wrong stream, or out of order, breaks the run."""
    return (1 + stream * 80 + i) % 256


@dataclass
class Host:
    process: subprocess.Popen[bytes]
    address: str
    health_address: str
    log: Path

    def pid(self, name: str) -> int:
        """The newest pid the supervisor logged for ``name`` ("worker 0", "the inference
        process")."""
        found = re.findall(rf"{name} started \(pid (\d+)\)", self.log.read_text())
        return int(found[-1])


@pytest.fixture
def host(cache_dir: Path, tmp_path: Path) -> Iterator[Host]:
    port_file = tmp_path / "port"
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "framecast_client.cli", "serve", "--workers", "2",
        "--inference", "shared", "--port", "0", "--port-file", str(port_file),
        "--health-port", "0", "--backend", "null", "--offline", "--cache-dir", str(cache_dir),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stderr=sink, env={**env, "PYTHONWARNINGS": "error"})
    try:
        wait_until(
            lambda: port_file.exists() or process.poll() is not None,
            "the port file",
            timeout_s=WAIT_S,
        )
        assert process.poll() is None, log.read_text()
        found = re.search(r"health only \(plaintext\) on port (\d+)", log.read_text())
        assert found, log.read_text()
        yield Host(
            process, f"127.0.0.1:{port_file.read_text().strip()}", f"127.0.0.1:{found[1]}", log
        )
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()


@dataclass
class Stream:
    """A lossless SDK stream of paced, keyed frames; what it got back, in order."""

    address: str
    index: int
    outcomes: list[object] = field(default_factory=list)
    frame_ids: list[int] = field(default_factory=list)
    reconnects: int = 0
    thread: threading.Thread | None = None
    client: Client | None = None

    def frames(self) -> Iterator[NDArray[np.uint8]]:
        for i in range(FRAMES):
            time.sleep(0.01)  # a camera, not a flood: the outage lands mid-stream
            yield keyed(stream_key(self.index, i))

    def start(self) -> None:
        """Start the stream (a session has a connection of its own) and wait for an answer."""
        if self.client is None:
            self.client = Client(self.address, timeout=WAIT_S)
            self.client.model_info()  # its unary connection, opened before the stream's
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        wait_until(lambda: self.outcomes, "the stream's first answer", timeout_s=WAIT_S)

    def _run(self) -> None:
        assert self.client is not None
        with self.client, self.client.stream(self.frames(), mode="lossless") as session:
            for result in session:
                self.outcomes.append(result.outcome)
                self.frame_ids.append(result.index)
            self.reconnects = session.stats.reconnects

    def check(self) -> None:
        """Every frame answered exactly once, in order, with its own class."""
        assert self.thread is not None
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), f"stream {self.index} never ended"
        assert self.frame_ids == list(range(FRAMES)), f"stream {self.index}: {self.frame_ids}"
        classified = [o.top.index for o in self.outcomes if isinstance(o, Classification)]
        assert classified == [stream_key(self.index, i) for i in range(FRAMES)], self.outcomes


@dataclass
class Caller:
    """A unary caller on its own connection, classifying keyed frames in a loop."""

    address: str
    index: int
    stop: threading.Event
    # (start, end, key, code, details, class answered) of every call.
    calls: list[tuple[float, float, int, grpc.StatusCode, str, int]] = field(default_factory=list)
    thread: threading.Thread | None = None
    raw: RawClassifier | None = None

    def start(self) -> None:
        self.raw = RawClassifier(self.address, own_connection=True)
        assert self.raw.status("get_model_info", b"")[0] is grpc.StatusCode.OK
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        assert self.raw is not None
        n = 0
        while not self.stop.is_set():
            key = 200 + self.index * 10 + n % 10
            n += 1
            request = wire.classify_request_bytes(keyed(key)[None], top_k=1)
            started = time.monotonic()
            try:
                reply = pb.ClassifyResponse.FromString(self.raw.classify(request, timeout=WAIT_S))
                code, details = grpc.StatusCode.OK, ""
                answered = reply.results[0].predictions[0].index
            except grpc.RpcError as error:
                code, details, answered = error.code(), error.details() or "", -1
            self.calls.append((started, time.monotonic(), key, code, details, answered))
            if code is not grpc.StatusCode.OK:
                time.sleep(0.05)  # a client backing off, not spinning

    def finish(self) -> None:
        assert self.thread is not None
        assert self.raw is not None
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive()
        self.raw.close()
        for _, _, key, code, _, answered in self.calls:
            if code is grpc.StatusCode.OK:
                assert answered == key, self.calls  # never another call's answer


def connections(pid: int, port: int) -> set[int]:
    """The socket inodes of ``pid``'s established TCP connections on local ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], int(parts[9])
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                found.add(inode)
    return found


def test_a_killed_inference_process_under_load_loses_no_stream_frame_and_refuses_unary_calls(
    host: Host,
) -> None:
    victim = host.pid("the inference process")
    stop = threading.Event()
    streams = [Stream(host.address, i) for i in range(STREAMS)]
    callers = [Caller(host.address, i, stop) for i in range(CALLERS)]
    try:
        for stream in streams:
            stream.start()
        for caller in callers:
            caller.start()
        wait_until(
            lambda: (
                all(len(s.outcomes) > 20 for s in streams)
                and all(len(c.calls) > 5 for c in callers)
            ),
            "every stream and caller to be served",
            timeout_s=WAIT_S,
        )
        assert health_status(host.address) == SERVING
        assert health_status(host.health_address) == SERVING
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        # Every front end says so, on the gRPC port and on the health-only port.
        wait_until(lambda: health_status(host.address) == NOT_SERVING, "NOT_SERVING", timeout_s=10)
        wait_until(
            lambda: health_status(host.health_address) == NOT_SERVING,
            "NOT_SERVING on the health port",
            timeout_s=10,
        )
        # New unary calls while it is away (a connection of their own, to either front end).
        outage_calls: list[tuple[grpc.StatusCode, str]] = []
        probe = RawClassifier(host.address, own_connection=True)
        request = wire.classify_request_bytes(keyed(7)[None], top_k=1)
        while health_status(host.address) == NOT_SERVING and len(outage_calls) < 50:
            outage_calls.append(probe.status("classify", request, timeout=WAIT_S))
        probe.close()
        # The supervisor restarts it, and health comes back.
        wait_until(
            lambda: f"(pid {victim}) was killed by SIGKILL" in host.log.read_text(),
            "the supervisor to see it die",
            timeout_s=WAIT_S,
        )
        wait_until(lambda: health_status(host.address) == SERVING, "SERVING", timeout_s=WAIT_S)
        wait_until(
            lambda: health_status(host.health_address) == SERVING,
            "SERVING on the health port",
            timeout_s=WAIT_S,
        )
        assert host.pid("the inference process") != victim
        # Unary calls go on being answered after the restart.
        count = {id(c): len(c.calls) for c in callers}
        wait_until(
            lambda: all(
                any(call[3] is grpc.StatusCode.OK for call in c.calls[count[id(c)] :])
                for c in callers
            ),
            "unary calls answered after the restart",
            timeout_s=WAIT_S,
        )
    finally:
        stop.set()
        for caller in callers:
            caller.finish()
    for stream in streams:
        stream.check()  # lossless: every frame once, in order, its own answer
    # A unary call arriving during the outage is refused at once with UNAVAILABLE and a message
    # that says why, not held until the restart (held, it would have come back OK). (The
    # callers' calls in flight at the kill are sent again to the new process and answered.)
    assert outage_calls, "no unary call was made during the outage"
    refused = [c for c in outage_calls if c[0] is grpc.StatusCode.UNAVAILABLE]
    assert refused, outage_calls
    for code, details in outage_calls:
        # OK only at the end: a front end back a moment before the probe saw it.
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), outage_calls
        if code is grpc.StatusCode.UNAVAILABLE:
            assert "inference process is restarting" in details, details
    failed = [call for c in callers for call in c.calls if call[3] is not grpc.StatusCode.OK]
    for started, _, _, code, details, _ in failed:
        assert code is grpc.StatusCode.UNAVAILABLE, failed
        assert "inference process is restarting" in details, details
        assert killed <= started, "a call failed before the kill"


def test_a_killed_front_end_loses_only_its_own_connections(host: Host) -> None:
    port = int(host.address.rsplit(":", 1)[1])
    fronts = [host.pid("worker 0"), host.pid("worker 1")]
    # Place each stream and caller: the front end whose connections grew when it connected.
    placed: dict[int, list[Stream | Caller]] = {pid: [] for pid in fronts}
    stop = threading.Event()
    workers: list[Stream | Caller] = [
        *(Stream(host.address, i) for i in range(4)),
        *(Caller(host.address, i, stop) for i in range(4)),
    ]
    try:
        for worker in workers:
            if isinstance(worker, Stream):
                # Its client's unary connection first (model_info), then the stream's own.
                worker.client = Client(host.address, timeout=WAIT_S)
                worker.client.model_info()
            before = {pid: connections(pid, port) for pid in fronts}
            worker.start()
            grew = [pid for pid in fronts if connections(pid, port) - before[pid]]
            assert len(grew) == 1, grew
            placed[grew[0]].append(worker)
        if not all(placed.values()):
            pytest.skip("the kernel put every connection on one front end (1 in 128)")
        victim, survivor = fronts
        wait_until(
            lambda: all(len(w.outcomes if isinstance(w, Stream) else w.calls) > 5 for w in workers),
            "every stream and caller to be served",
            timeout_s=WAIT_S,
        )
        inference = host.pid("the inference process")
        calls_before = {id(w): len(w.calls) for w in workers if isinstance(w, Caller)}
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: f"(pid {victim}) was killed by SIGKILL" in host.log.read_text(),
            "the supervisor to see it die",
            timeout_s=WAIT_S,
        )
        wait_until(
            lambda: host.log.read_text().count("worker 0 serving") >= 2,
            "the new front end",
            timeout_s=WAIT_S,
        )
        # The survivor's callers went on being answered since the kill.
        wait_until(
            lambda: all(
                len(c.calls) > calls_before[id(c)] + 3
                for c in placed[survivor]
                if isinstance(c, Caller)
            ),
            "the survivor's callers to go on",
            timeout_s=WAIT_S,
        )
        assert host.pid("the inference process") == inference  # untouched
    finally:
        stop.set()
        for worker in workers:
            if isinstance(worker, Caller):
                worker.finish()
    for worker in workers:
        if isinstance(worker, Stream):
            worker.check()  # lossless on both: the victim's streams reconnected and resent
    for worker in placed[survivor]:
        if isinstance(worker, Stream):
            assert worker.reconnects == 0  # never interrupted
        else:
            assert all(call[3] is grpc.StatusCode.OK for call in worker.calls), worker.calls
    for worker in placed[victim]:
        if isinstance(worker, Stream):
            assert worker.reconnects >= 1  # its connection was lost, and only its own
        else:
            assert {call[3] for call in worker.calls} <= {
                grpc.StatusCode.OK,
                grpc.StatusCode.UNAVAILABLE,
            }, worker.calls
