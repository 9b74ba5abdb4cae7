"""A `serve --workers 2 --inference shared` host whose backend a test controls, from outside.

The in-process suites hold their backend with a threading.Event; here the backend runs in the
inference process, so it is steered through files in a control directory:

* ``hold`` present: every batch waits (as ``HoldableNullBackend.hold()``) until it is removed;
  ``entered`` is written when a batch waits, so the test knows a frame is stuck in the server;
* ``seen``: the first pixel of every image run, one per line (as ``GatedBackend.seen``);
* images whose first pixel is ``fail_key`` fail, as a broken backend would.

The host is started by :func:`main` in its own process (``python -c "import shared_host;
shared_host.main()" SPEC``): the supervisor needs the main thread for its signals, and the
factory must be importable by the spawned processes (this module is, by its name, on the
sys.path that multiprocessing hands them). Imports only numpy and the server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from framecast_server.backends.base import BackendError, BackendInfo
from framecast_server.backends.null import NullBackend
from numpy.typing import NDArray

HOLD_TIMEOUT_S = 60.0  # as support.HOLD_TIMEOUT_S: a test that never releases still ends
POLL_S = 0.002


class ControlledBackend:
    """A NullBackend held, recorded and failed through files (see the module doc)."""

    def __init__(self, control: Path, max_batch: int, fail_key: int | None) -> None:
        self._inner = NullBackend(max_batch=max_batch)
        self._control = control
        self._fail_key = fail_key

    @property
    def info(self) -> BackendInfo:
        return self._inner.info

    @property
    def max_batch(self) -> int:
        return self._inner.max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        keys = "".join(f"{int(v)}\n" for v in images[:, 0, 0, 0])
        with (self._control / "seen").open("a") as seen:
            seen.write(keys)
        hold = self._control / "hold"
        if hold.exists():
            (self._control / "entered").touch()
            deadline = time.monotonic() + HOLD_TIMEOUT_S
            while hold.exists():
                if time.monotonic() > deadline:
                    raise BackendError("the test never released the gate")
                time.sleep(POLL_S)
        if self._fail_key is not None and self._fail_key in images[:, 0, 0, 0]:
            raise BackendError(f"cannot classify key {self._fail_key}")
        return self._inner.infer(images)

    def close(self) -> None:
        self._inner.close()


@dataclasses.dataclass(frozen=True)
class ControlledBackendFactory:
    """Picklable (prepared ONNX path -> ControlledBackend), for Supervisor(backend_factory=)."""

    control: Path
    max_batch: int
    fail_key: int | None = None

    def __call__(self, _onnx: Path) -> ControlledBackend:
        return ControlledBackend(self.control, self.max_batch, self.fail_key)


@dataclasses.dataclass(frozen=True)
class HostSpec:
    """What :func:`main` runs (pickled to a file by the test)."""

    settings: object  # ServerSettings (kept loose: this module imports no settings at load)
    workers: int
    factory: ControlledBackendFactory
    port_file: Path


def main() -> None:
    """Run the host of ``sys.argv[1]`` (a pickled HostSpec) until SIGTERM; log to stderr.

    Also writes ``link.json`` (the shared blocks' names) into the control directory, so the
    test can read the queue and admitted bytes the inference process publishes.
    """
    from framecast_server.process import shared_inference
    from framecast_server.process.workers import Supervisor
    from framecast_server.settings import ServerSettings

    spec: HostSpec = pickle.loads(Path(sys.argv[1]).read_bytes())
    assert isinstance(spec.settings, ServerSettings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    create_link = shared_inference.create_link

    def recorded_link(*args: object, **kwargs: object) -> shared_inference.InferenceLink:
        link = create_link(*args, **kwargs)  # type: ignore[arg-type]
        (spec.factory.control / "link.json").write_text(json.dumps(dataclasses.asdict(link)))
        return link

    shared_inference.create_link = recorded_link
    supervisor = Supervisor(
        spec.settings,
        spec.workers,
        port_file=spec.port_file,
        inference="shared",
        backend_factory=spec.factory,
    )
    raise SystemExit(supervisor.run())
