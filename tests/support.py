"""Helpers shared by tests (importable thanks to pytest's pythonpath = tests)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from framecast_server.backends.base import Backend, BackendError, BackendInfo
from framecast_server.backends.null import NullBackend
from framecast_server.process.app import REFUSING
from framecast_server.process.background import BackgroundServer
from framecast_server.settings import ServerSettings
from numpy.typing import NDArray

INPUT_SIZE = 224
HOLD_TIMEOUT_S = 60.0  # how long a held backend waits for its test to release it
# How long a test waits for something that takes milliseconds when the machine is idle: long
# enough for a loaded 2-core CI runner, and a real hang still fails.
WAIT_S = 30.0


def wait_until(
    condition: Callable[[], object],
    what: str,
    *,
    timeout_s: float = WAIT_S,
    seen: Callable[[], object] | None = None,
    interval_s: float = 0.01,
) -> None:
    """Poll ``condition`` until it is true; fail saying what was awaited, and ``seen()`` then.

    The one wait-until of the tests: a test states the condition it needs, never a sleep.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            saw = f"; saw {seen()}" if seen is not None else ""
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}{saw}")
        time.sleep(interval_s)


def make_settings(cache_dir: Path, **overrides: Any) -> ServerSettings:
    """Settings for an in-process test server: port 0, offline, small batches."""
    values: dict[str, Any] = {
        "port": 0,
        "backend": "onnxruntime",
        "allow_download": False,
        "cache_dir": cache_dir,
        "max_batch": 8,
        "threads": 2,
    }
    values.update(overrides)
    return ServerSettings(**values)


@contextlib.contextmanager
def running_server(
    cache_dir: Path,
    *,
    backend_instance: Backend | None = None,
    load: bool = True,
    **overrides: Any,
) -> Iterator[BackgroundServer]:
    """A real server on a free loopback port, stopped on exit: the null backend by default.

    ``backend_instance`` replaces the backend the settings name (a test's held or failing
    one); ``overrides`` are ServerSettings fields (backend, TLS, tokens, limits, metrics_port).
    """
    overrides.setdefault("backend", "null")
    factory = None if backend_instance is None else (lambda _path: backend_instance)
    with BackgroundServer(
        make_settings(cache_dir, **overrides), backend_factory=factory, load=load
    ) as server:
        yield server


@pytest.fixture
def start_server(cache_dir: Path) -> Iterator[Callable[..., BackgroundServer]]:
    """Start servers as :func:`running_server` does; each is stopped when the test ends."""
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(running_server(cache_dir, **kwargs))


def not_a_classifier(path: Path) -> Path:
    """Write a valid ONNX graph that is not an image classifier: it fails when served."""
    import onnx

    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "not-a-classifier",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(onnx.helper.make_model(graph), str(path))
    return path


def fails_its_test_run(path: Path) -> Path:
    """Write an image classifier by its shapes whose Reshape bakes in a batch of 1: it passes
    the checks made before the server listens and fails its test run, while loading."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((3, 1000), dtype=np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Reshape", ["pooled", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "batch-of-one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000])],
        [weights, shape],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def random_frames(count: int, *, seed: int = 0, size: int = INPUT_SIZE) -> NDArray[np.uint8]:
    """Preprocessed-size uint8 RGB frames, different from each other."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


class GatedBackend:
    """A backend that holds each batch until ``release`` is set: makes "in flight" observable.

    It records the first pixel value of every image it ran in ``seen``, so a test can tell
    which requests reached it and which were dropped before compute.
    """

    def __init__(self, max_batch: int = 8) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[int] = []
        self._max_batch = max_batch

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("gated", "fp32", "cpu")

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.seen.extend(int(v) for v in images[:, 0, 0, 0])
        self.entered.set()
        if not self.release.wait(30):
            raise RuntimeError("never released")
        return np.full((len(images), 1000), 1e-3, dtype=np.float32)

    def close(self) -> None:
        self.release.set()


class HoldableNullBackend:
    """A NullBackend whose infer() can be held: hold() makes the next calls block until release().

    ``entered`` is set when a call is blocked, so a test knows a frame is stuck in the server.
    ``fail_key`` makes images with that key fail, as a broken backend would.
    """

    def __init__(self, fail_key: int | None = None, max_batch: int = 32) -> None:
        self._inner = NullBackend(max_batch=max_batch)
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()
        self._fail_key = fail_key
        # The first pixel of every image run, as GatedBackend.seen (what reached compute).
        self.seen: list[int] = []

    @property
    def info(self) -> BackendInfo:
        return self._inner.info

    @property
    def max_batch(self) -> int:
        return self._inner.max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.seen.extend(int(v) for v in images[:, 0, 0, 0])
        if not self._open.is_set():
            self.entered.set()
            if not self._open.wait(HOLD_TIMEOUT_S):
                raise BackendError("the test never released the gate")
        if self._fail_key is not None and self._fail_key in images[:, 0, 0, 0]:
            raise BackendError(f"cannot classify key {self._fail_key}")
        return self._inner.infer(images)

    def close(self) -> None:
        self._inner.close()


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._entry])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def write_tokens(path: Path, *names: str) -> Path:
    """A token file giving each name the token ``<name>-secret``."""
    path.write_text("".join(f"{name}:{name}-secret\n" for name in names))
    return path


class RawClassifier:
    """framecast.v1.Classifier over a real channel with no serializers: bytes in, bytes out.

    What a test needs to send bytes that are not a valid message.
    """

    def __init__(
        self, address: str, *, own_connection: bool = False, token: str | None = None
    ) -> None:
        # Channels with equal settings in one process share a connection unless each keeps
        # its own. ``token``: sent on every call (the server knows the caller by its name).
        options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
        self.channel = grpc.insecure_channel(address, options=options)
        if token is not None:
            self.channel = grpc.intercept_channel(self.channel, _Bearer(token))
        # grpc-stubs wants serializers; without them the channel passes bytes through.
        self.get_model_info = self.channel.unary_unary(  # type: ignore[call-arg]
            "/framecast.v1.Classifier/GetModelInfo"
        )
        self.classify = self.channel.unary_unary(  # type: ignore[call-arg]
            "/framecast.v1.Classifier/Classify"
        )
        self.stream = self.channel.stream_stream(  # type: ignore[call-arg]
            "/framecast.v1.Classifier/ClassifyStream"
        )

    def status(self, method: str, raw: bytes, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
        """Call a unary ``method`` ("classify", "get_model_info") with ``raw``: its status."""
        try:
            getattr(self, method)(raw, timeout=timeout)
        except grpc.RpcError as error:
            return error.code(), error.details() or ""
        return grpc.StatusCode.OK, ""

    def close(self) -> None:
        self.channel.close()


def write_downloaded_weights(cache_dir: Path, *, seed: int = 20) -> Path:
    """Leave ``cache_dir`` as a download of the default weights leaves it, with no network:
    random ResNet-50 weights as ``weights/<CACHED_FILENAME>`` and, beside them, their SHA-256
    as the published checksum. ``--require-pretrained`` then accepts them."""
    from framecast_server.model import PRESETS, random_weights
    from framecast_server.model.download import CACHED_FILENAME, CHECKSUM_SUFFIX, file_sha256
    from safetensors.numpy import save_file

    weights = cache_dir / "weights" / CACHED_FILENAME
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(random_weights(seed, PRESETS["torchvision"]), str(weights))
    weights.with_name(weights.name + CHECKSUM_SUFFIX).write_text(file_sha256(weights) + "\n")
    return weights


@dataclass
class ServeProcess:
    """A `framecast serve` process on a free loopback port: its address and its stderr log."""

    process: subprocess.Popen[bytes]
    address: str
    log: Path

    def tail(self, lines: int = 15) -> str:
        """The log's last lines, for a failure to show what the server was doing."""
        return " | ".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def serve_process(tmp_path: Path, *words: str, name: str = "serve") -> Iterator[ServeProcess]:
    """Run ``framecast WORDS --port-file F`` (``serve`` and its flags, ``--port 0`` among them),
    as a user would, until it listens; on the way out, stop it if it still runs (SIGTERM, then
    SIGKILL after 30 s). Its stderr goes to ``tmp_path/NAME.log``; warnings are errors.

    The one way the tests start a server process; whether it must be SERVING first (and how
    to ask, with TLS or tokens) is the test's to wait for.
    """
    port_file = tmp_path / f"{name}.port"
    log = tmp_path / f"{name}.log"
    command = [sys.executable, "-m", "framecast_client.cli", *words, "--port-file", str(port_file)]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stderr=sink, env={**env, "PYTHONWARNINGS": "error"})
    try:
        wait_until(
            lambda: port_file.exists() or process.poll() is not None,
            "the server to listen",
            timeout_s=120.0,  # generous: a loaded 2-core machine starts processes slowly
            seen=lambda: log.read_text(errors="replace")[-2000:],
        )
        assert process.poll() is None, log.read_text()
        yield ServeProcess(process, f"127.0.0.1:{port_file.read_text().strip()}", log)
    finally:
        if process.poll() is None:
            process.terminate()  # a supervisor removes its directory; a kill would leave it
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()


@dataclass
class Host:
    """A `framecast serve --workers 2 --metrics-port 0` process: its gRPC address and metrics."""

    process: subprocess.Popen[bytes]
    address: str
    metrics_port: int
    log: Path


@contextlib.contextmanager
def serve_workers(
    cache_dir: Path, tmp_path: Path, *flags: str, inference: str = "per-worker"
) -> Iterator[Host]:
    """A real two-worker server on loopback (null backend, offline, and ``flags``), stopped
    with SIGTERM; ``inference``: ``--inference`` (per-worker backends, or one shared inference
    process)."""
    words = [
        "serve", "--workers", "2", "--inference", inference, "--port", "0", "--metrics-port", "0",
        "--backend", "null", "--offline", "--cache-dir", str(cache_dir), *flags,
    ]  # fmt: skip
    with serve_process(tmp_path, *words) as server:
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", server.log.read_text())
        assert found, server.log.read_text()
        yield Host(server.process, server.address, int(found[1]), server.log)
    # Stopped: a clean shutdown leaves no traceback in the log (the resource tracker printed
    # one per shared block when the supervisor released them twice).
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]


# ------------------------------------------------------------------ one test, two kinds of host

IN_PROCESS = "in-process"
SHARED = "workers=2-shared"
# What a parametrized suite runs against: one in-process server (its backend in the test's
# process), or `serve --workers 2 --inference shared` (two front ends and one inference process,
# real processes, the backend steered through files: shared_host.py).
HOST_KINDS = (IN_PROCESS, SHARED)


class ServedHost:
    """A server a test talks to from outside, and steers through its backend.

    ``hold``/``release``/``wait_entered``/``seen`` act on the backend (a HoldableNullBackend, or
    its file-steered twin in the inference process); ``queued``/``admitted_bytes`` are the
    host's batcher (in shared mode the figures the inference process publishes to its front
    ends); ``drain`` is SIGTERM for processes and ``close`` for an in-process server.
    """

    kind: str
    address: str
    metrics_port: int | None

    def hold(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def wait_entered(self, timeout_s: float = WAIT_S) -> bool:
        raise NotImplementedError

    def seen(self) -> list[int]:
        raise NotImplementedError

    def forget(self) -> None:
        """Forget what the backend has seen and that a batch entered the hold."""
        raise NotImplementedError

    def queued(self) -> int:
        raise NotImplementedError

    def admitted_bytes(self) -> int:
        raise NotImplementedError

    def drain(self) -> None:
        """Begin the drain (returns at once); :meth:`wait_stopped` waits for its end."""
        raise NotImplementedError

    def draining(self) -> bool:
        """True once the drain began (streams wind down; new calls are still served)."""
        raise NotImplementedError

    def refusing(self) -> bool:
        """True once the drain refuses new calls (none arrived for a moment)."""
        raise NotImplementedError

    def wait_stopped(self, timeout_s: float = WAIT_S) -> None:
        raise NotImplementedError


class _InProcessHost(ServedHost):
    kind = IN_PROCESS

    def __init__(self, server: BackgroundServer, backend: HoldableNullBackend) -> None:
        self.server = server
        self.backend = backend
        self.address = server.address
        self.metrics_port = server.server.wiring.metrics_port
        self._stopping: threading.Thread | None = None

    def hold(self) -> None:
        self.backend.hold()

    def release(self) -> None:
        self.backend.release()

    def wait_entered(self, timeout_s: float = WAIT_S) -> bool:
        return self.backend.entered.wait(timeout_s)

    def seen(self) -> list[int]:
        return list(self.backend.seen)

    def forget(self) -> None:
        self.backend.seen.clear()
        self.backend.entered.clear()

    def _batcher(self) -> Any:
        serving = self.server.serving
        assert serving is not None
        return serving.batcher

    def queued(self) -> int:
        return int(self._batcher().queued)

    def admitted_bytes(self) -> int:
        return int(self._batcher().admitted_bytes)

    def drain(self) -> None:
        self._stopping = threading.Thread(target=self.server.close)
        self._stopping.start()

    def draining(self) -> bool:
        return self.server.server.gate.draining

    def refusing(self) -> bool:
        return self.server.server.gate.closed

    def wait_stopped(self, timeout_s: float = WAIT_S) -> None:
        assert self._stopping is not None
        self._stopping.join(timeout_s)
        assert not self._stopping.is_alive(), "the server did not stop"


class _SharedHost(ServedHost):
    kind = SHARED

    def __init__(
        self, process: subprocess.Popen[bytes], address: str, control: Path, log: Path
    ) -> None:
        from framecast_server.core.batcher import BatcherSettings
        from framecast_server.process.shared_inference import InferenceLink, InferenceProxy

        self.process = process
        self.address = address
        self.control = control
        self.log = log
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log.read_text())
        self.metrics_port = int(found[1]) if found else None
        fields = json.loads((control / "link.json").read_text())
        fields["region_names"] = tuple(fields["region_names"])
        # A reader of the counters the inference process publishes (never started: it
        # submits nothing, it only reads the host's queue and admitted bytes).
        self._published = InferenceProxy(InferenceLink(**fields), 0, BatcherSettings())

    def hold(self) -> None:
        (self.control / "entered").unlink(missing_ok=True)
        (self.control / "hold").touch()

    def release(self) -> None:
        (self.control / "hold").unlink(missing_ok=True)

    def wait_entered(self, timeout_s: float = WAIT_S) -> bool:
        deadline = time.monotonic() + timeout_s
        while not (self.control / "entered").exists():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def seen(self) -> list[int]:
        seen = self.control / "seen"
        return [int(line) for line in seen.read_text().split()] if seen.exists() else []

    def forget(self) -> None:
        (self.control / "seen").unlink(missing_ok=True)
        (self.control / "entered").unlink(missing_ok=True)

    def queued(self) -> int:
        return self._published.queued

    def admitted_bytes(self) -> int:
        return self._published.admitted_bytes

    def drain(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def draining(self) -> bool:
        # Each front end logs this as it begins (the drain delay is 0 in these tests), then
        # health turns NOT_SERVING.
        return self.log.read_text().count("draining (grace") == 2 and (
            health_status(self.address) == NOT_SERVING
        )

    def refusing(self) -> bool:
        # Each front end logs this once calls stopped arriving after its drain began.
        return self.log.read_text().count(REFUSING) == 2

    def wait_stopped(self, timeout_s: float = WAIT_S) -> None:
        assert self.process.wait(timeout=timeout_s) == 0, self.log.read_text()


def health_status(address: str, timeout_s: float = 5.0) -> int | None:
    """grpc.health.v1 Check of the whole server at ``address`` (None: no answer)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
    except grpc.RpcError:
        return None
    return int(reply.status)


SERVING, NOT_SERVING = 1, 2  # grpc.health.v1.HealthCheckResponse.ServingStatus


@contextlib.contextmanager
def served_host(
    kind: str,
    cache_dir: Path,
    tmp_path: Path,
    *,
    fail_key: int | None = None,
    **overrides: Any,
) -> Iterator[ServedHost]:
    """A server of ``kind`` (HOST_KINDS) with ``overrides`` (ServerSettings fields; the null
    backend held and recorded by the test), stopped on exit."""
    overrides.setdefault("backend", "null")
    settings = make_settings(cache_dir, **overrides)
    if kind == IN_PROCESS:
        backend = HoldableNullBackend(fail_key=fail_key, max_batch=settings.max_batch)
        with BackgroundServer(settings, backend_factory=lambda _: backend) as server:
            host = _InProcessHost(server, backend)
            host.forget()  # the warm-up image
            yield host
        return
    assert kind == SHARED, kind
    import pickle

    from shared_host import ControlledBackendFactory, HostSpec

    base = Path(tempfile.mkdtemp(prefix="host-", dir=tmp_path))
    control = base / "control"
    control.mkdir()
    port_file, log, spec_file = base / "port", base / "serve.log", base / "spec.pickle"
    factory = ControlledBackendFactory(control, settings.max_batch, fail_key)
    spec_file.write_bytes(pickle.dumps(HostSpec(settings, 2, factory, port_file)))
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    tests = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-c", "import shared_host; shared_host.main()", str(spec_file)]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stderr=sink, env={**env, "PYTHONWARNINGS": "error"})
    try:
        wait_until(
            lambda: port_file.exists() or process.poll() is not None,
            "the port file",
            timeout_s=60.0,  # generous: a loaded 2-core machine starts processes slowly
        )
        assert process.poll() is None, log.read_text()
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        shared = _SharedHost(process, address, control, log)
        shared.forget()  # the warm-up images
        yield shared
    finally:
        (control / "hold").unlink(missing_ok=True)
        if process.poll() is None:
            process.terminate()  # the supervisor removes its blocks; a kill would leave them
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()


def in_process_only(reason: str) -> Callable[[Any], Any]:
    """For a suite run against both kinds of host: this test runs in process only (its shared
    variant is reported skipped, saying why)."""
    skipped = pytest.param(SHARED, marks=pytest.mark.skip(reason=f"in-process only: {reason}"))

    def mark(test: Any) -> Any:
        test = pytest.mark.parametrize("host_kind", [IN_PROCESS, skipped], indirect=True)(test)
        return pytest.mark.usefixtures("host_kind")(test)

    return mark


@pytest.fixture(params=HOST_KINDS)
def host_kind(request: pytest.FixtureRequest) -> str:
    """Which kind of host a parametrized test runs against (HOST_KINDS)."""
    kind: str = request.param
    return kind


@pytest.fixture
def start_host(
    host_kind: str, cache_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., ServedHost]]:
    """Start hosts of the test's kind, as :func:`served_host`; each is stopped at the end."""
    with contextlib.ExitStack() as stack:
        yield lambda **kwargs: stack.enter_context(
            served_host(host_kind, cache_dir, tmp_path, **kwargs)
        )
