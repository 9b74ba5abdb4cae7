"""The side-by-side benchmarks' local Triton: the bare ``tritonserver`` nvidia-pytriton bundles.

No PyTriton proxy: the bundled binary is started directly on a model repository (a temporary
directory) holding a plain python-backend model, the null backend's counterpart
(server/src/framecast_server/backends/null.py): input ``images`` UINT8 [-1, 224, 224, 3],
output ``probabilities`` FP32 [-1, 1000], each image's row one gather from a fixed table keyed
by its first byte (no pass over the pixels), with dynamic batching. PyTriton's own ``Triton()``
adds a hop (its proxy model relays every request over ZeroMQ to the Python process) that costs
about three times as much per request, so it is not the Triton to compare against.

nvidia-pytriton pins numpy<2, so it lives in an environment of its own, found by
``find_triton_python``; that interpreter also runs the model (the python backend's stub embeds
its libpython and finds its numpy through ``PATH``):

    uv venv .venv-triton
    uv pip install --python .venv-triton/bin/python nvidia-pytriton==0.7.0
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PYTHONS = (REPO_ROOT / ".venv-triton" / "bin" / "python",)
MODEL = "resnet50"
CLASSES = 1000
SIZE = 224
START_TIMEOUT_S = 120.0
PORT_ATTEMPTS = 3

# Run by the candidate interpreter: where its nvidia-pytriton and libpython are (no import of
# pytriton itself, which pulls in half of its dependencies).
_PROBE = """
import importlib.metadata, importlib.util, json, sys, sysconfig
spec = importlib.util.find_spec("pytriton")
print(json.dumps({
    "pytriton": None if spec is None else list(spec.submodule_search_locations)[0],
    "pytriton_version": None if spec is None else importlib.metadata.version("nvidia-pytriton"),
    "numpy": importlib.util.find_spec("numpy") is not None,
    "python": "%d.%d" % sys.version_info[:2],
    "libdir": sysconfig.get_config_var("LIBDIR") or "",
}))
"""

# The python backend's model: what NullBackend.infer returns, computed the same way.
_MODEL_PY = f'''"""Framecast's null backend as a Triton python-backend model (from triton_local)."""

import numpy as np
import triton_python_backend_utils as pb_utils

CLASSES = {CLASSES}


class TritonPythonModel:
    def initialize(self, args):
        weights = 1.0 / np.arange(1, CLASSES + 1, dtype=np.float64) ** 2
        distribution = (weights / weights.sum()).astype(np.float32)
        keys = np.arange(256, dtype=np.intp)[:, None]
        # Row k peaks at class k % CLASSES: one gather per request, no arithmetic.
        self.rows = distribution[(np.arange(CLASSES, dtype=np.intp)[None, :] - keys) % CLASSES]

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "images").as_numpy()
            probabilities = pb_utils.Tensor("probabilities", self.rows[images[:, 0, 0, 0]])
            responses.append(pb_utils.InferenceResponse(output_tensors=[probabilities]))
        return responses
'''

_CONFIG = """name: "{model}"
backend: "python"
max_batch_size: {max_batch_size}
input [ {{ name: "images" data_type: TYPE_UINT8 dims: [ {size}, {size}, 3 ] }} ]
output [ {{ name: "probabilities" data_type: TYPE_FP32 dims: [ {classes} ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
"""


@dataclass(frozen=True)
class TritonEndpoints:
    """Where a running local Triton answers."""

    grpc: str  # "127.0.0.1:PORT"
    http: str  # "127.0.0.1:PORT"
    model: str  # model name


@dataclass(frozen=True)
class TritonProcess:
    """A running bare tritonserver: its endpoints, pid (for CPU time) and what it is."""

    endpoints: TritonEndpoints
    pid: int
    version: str  # tritonserver's, from its metadata
    pytriton_version: str

    @property
    def description(self) -> str:
        """What the benchmarks print as their Triton anchor."""
        return (
            f"tritonserver {self.version} (bundled by nvidia-pytriton {self.pytriton_version}), "
            "python backend null model, no PyTriton proxy"
        )


@dataclass(frozen=True)
class _Install:
    """The parts of an nvidia-pytriton installation that a bare tritonserver needs."""

    python: str
    binary: Path
    backend: Path  # the python backend's directory, without a stub
    stub: Path
    library_path: str
    pytriton_version: str


def _inspect(python: str) -> tuple[_Install | None, str]:
    """(the installation behind ``python``, "") or (None, why it cannot run Triton)."""
    try:
        probe = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"nvidia-pytriton is not importable by {python} ({exc})"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"nvidia-pytriton is not importable by {python} ({last})"
    facts = json.loads(probe.stdout)
    if facts["pytriton"] is None:
        return None, f"nvidia-pytriton is not importable by {python}"
    if not facts["numpy"]:
        return None, f"{python} has nvidia-pytriton but no numpy, which the model needs"
    dist = Path(facts["pytriton"]) / "tritonserver"
    stub = dist / "python_backend_stubs" / facts["python"] / "triton_python_backend_stub"
    binary = dist / "bin" / "tritonserver"
    for needed in (binary, dist / "backends" / "python" / "libtriton_python.so", stub):
        if not needed.is_file():
            return None, f"{needed} is missing (nvidia-pytriton for Python {facts['python']})"
    # The wheel's own libraries (libcudart for the stub, which we run from elsewhere) and the
    # interpreter's libpython, which the stub embeds: as PyTriton's launcher sets them.
    libraries = [str(Path(facts["pytriton"]).parent / "nvidia_pytriton.libs"), facts["libdir"]]
    return _Install(
        python=python,
        binary=binary,
        backend=dist / "backends" / "python",
        stub=stub,
        library_path=os.pathsep.join(p for p in libraries if p),
        pytriton_version=facts["pytriton_version"],
    ), ""


def find_triton_python(explicit: str | None) -> tuple[str | None, str]:
    """(interpreter with nvidia-pytriton, "") or (None, the reason).

    ``explicit``, else $FRAMECAST_TRITON_PYTHON, else .venv-triton/bin/python in the repository
    root; the first one given is the only one tried.
    """
    given = explicit or os.environ.get("FRAMECAST_TRITON_PYTHON")
    candidates = [given] if given else [str(p) for p in DEFAULT_PYTHONS if p.exists()]
    if not candidates:
        return None, (
            "nvidia-pytriton is not importable: no --triton-python, no $FRAMECAST_TRITON_PYTHON "
            f"and no {DEFAULT_PYTHONS[0]} (see benchmarks/triton_local.py)"
        )
    install, reason = _inspect(candidates[0])
    if install is None:
        return None, f"{reason} (see benchmarks/triton_local.py)"
    return install.python, ""


def _free_port() -> int:
    """A loopback port free now: tritonserver does not report a port 0 it was given."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _write_repository(root: Path, **config: int) -> Path:
    model = root / "models" / MODEL
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text(_MODEL_PY)
    (model / "config.pbtxt").write_text(
        _CONFIG.format(model=MODEL, size=SIZE, classes=CLASSES, **config)
    )
    return root / "models"


def _write_backends(root: Path, install: _Install) -> Path:
    """The python backend with the stub built for this Python (links, as PyTriton's copies)."""
    python = root / "backends" / "python"
    python.mkdir(parents=True)
    for part in install.backend.iterdir():
        (python / part.name).symlink_to(part)
    (python / "triton_python_backend_stub").symlink_to(install.stub)
    return root / "backends"


def _metadata(http: str, path: str) -> dict[str, object] | None:
    """GET http://{http}{path} as JSON, or None while it does not answer 200."""
    try:
        with urllib.request.urlopen(f"http://{http}{path}", timeout=5) as reply:
            answer: dict[str, object] = json.loads(reply.read() or b"{}")
            return answer
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _log_excerpt(log: Path) -> str:
    """tritonserver's error lines (or its last lines), for one message."""
    lines = log.read_text(errors="replace").strip().splitlines()
    errors = [line for line in lines if line[:1] == "E" and "CudaDriverHelper" not in line]
    return " | ".join((errors or lines)[-5:]) or "no output"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to tritonserver's process group (it and its stub), then SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the stub too, should it outlive tritonserver
    process.wait()


@contextlib.contextmanager
def bare_triton_process(
    python: str, *, max_batch_size: int = 64, max_queue_delay_us: int = 0, instances: int = 1
) -> Iterator[TritonProcess]:
    """``bare_triton``, also yielding tritonserver's pid and version."""
    if max_batch_size < 1 or instances < 1 or max_queue_delay_us < 0:
        raise ValueError(
            "max_batch_size and instances must be at least 1, max_queue_delay_us at least 0; "
            f"got {max_batch_size}, {instances}, {max_queue_delay_us}"
        )
    install, reason = _inspect(python)
    if install is None:
        raise RuntimeError(f"tritonserver cannot start: {reason}")
    with tempfile.TemporaryDirectory(prefix="framecast-triton-") as tmp_name:
        tmp = Path(tmp_name)
        repository = _write_repository(
            tmp,
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
        )
        backends = _write_backends(tmp, install)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (install.library_path, env.get("LD_LIBRARY_PATH", "")) if p
        )
        # The stub's embedded Python finds its prefix (and the venv's numpy) through PATH.
        env["PATH"] = os.pathsep.join((str(Path(python).parent), env.get("PATH", "")))
        for attempt in range(1, PORT_ATTEMPTS + 1):
            log = tmp / f"tritonserver-{attempt}.log"
            grpc_port, http_port = _free_port(), _free_port()
            command = [
                str(install.binary),
                f"--model-repository={repository}",
                f"--backend-directory={backends}",
                "--grpc-address=127.0.0.1", f"--grpc-port={grpc_port}",
                "--http-address=127.0.0.1", f"--http-port={http_port}",
                "--allow-metrics=false", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
                "--pinned-memory-pool-byte-size=0", "--exit-timeout-secs=10", "--log-verbose=0",
            ]  # fmt: skip
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            endpoints = TritonEndpoints(f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", MODEL)
            try:
                version = _wait_ready(process, endpoints, log)
                if version is None:  # a port was taken meanwhile: other ports
                    if attempt < PORT_ATTEMPTS:
                        continue
                    raise RuntimeError(
                        f"tritonserver did not start: {_log_excerpt(log)} (ports taken)"
                    )
                yield TritonProcess(endpoints, process.pid, version, install.pytriton_version)
                return
            finally:
                _stop(process)


def _wait_ready(
    process: subprocess.Popen[bytes], endpoints: TritonEndpoints, log: Path
) -> str | None:
    """tritonserver's version once the model is ready; None if it lost a port to another."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while _metadata(endpoints.http, f"/v2/models/{endpoints.model}/ready") is None:
        if process.poll() is not None:
            text = log.read_text(errors="replace")
            if "already in use" in text or "Address in use" in text or "Failed to bind" in text:
                return None
            raise RuntimeError(
                f"tritonserver did not start (exit status {process.returncode}): "
                f"{_log_excerpt(log)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"tritonserver's model was not ready after {START_TIMEOUT_S:.0f} s: "
                f"{_log_excerpt(log)}"
            )
        time.sleep(0.1)
    metadata = _metadata(endpoints.http, "/v2") or {}
    return str(metadata.get("version", "unknown"))


@contextlib.contextmanager
def bare_triton(
    python: str, *, max_batch_size: int = 64, max_queue_delay_us: int = 0, instances: int = 1
) -> Iterator[TritonEndpoints]:
    """Start the bundled tritonserver directly (no PyTriton proxy) on a temp model repository
    with the null python model; wait until ready; stop it (SIGTERM, then kill) on exit.

    Raises RuntimeError, with tritonserver's errors, if it does not start; ValueError for a
    max_batch_size or instances below 1 or a negative max_queue_delay_us.
    """
    with bare_triton_process(
        python,
        max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us,
        instances=instances,
    ) as triton:
        yield triton.endpoints
