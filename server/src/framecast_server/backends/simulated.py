"""A SIMULATED GPU: a backend whose batches cost what ResNet-50 FP16 costs on an H100.

No GPU runs here, so the question "per-worker backends or one shared inference process?" is
answered against this stand-in (benchmarks/gpu_feeding.py). Its figures are SIMULATED and say
nothing about a real GPU beyond the model below.

The latency model: a batch of n images holds the device for ``launch_us + n * per_image_us``.

* ``per_image_us = 20``: 50,000 images/s at large batches, the planning rate docs/scaling.md
  takes for our FP16 engine; it lies between the arithmetic bound of about 121,000 images/s
  (989 dense FP16 TFLOPS / 8.2 GFLOP per image) and MLPerf Inference's best H100 ResNet-50
  figure of about 89,000 images/s, which is INT8 (MLCommons results, as quoted in
  /work/shared/DESIGN.md "Numbers measured").
* ``launch_us = 400``: NVIDIA's TensorRT model-zoo table gives ResNet-50 v1 at 0.46 ms for
  batch 1 on an A100 (docs.nvidia.com/deeplearning/tensorrt/tensorflow-quantization-toolkit,
  "Model Zoo Results"); a batch of one is bound by launches and low occupancy, which a faster
  GPU hardly shortens, so most of that is taken as the fixed cost. The shape agrees with the
  older public TensorRT FP16 sweep on a V100 (gist 1duo/efd3be1d: 2.08 ms at batch 1,
  21.3 ms at 128), where the fixed part is about 13 images' worth of per-image work; here it
  is 20.

So batch 1 runs at 2,400 images/s, batch 32 at 30,800, batch 128 at 43,200: the device needs
batches in the tens to hundreds, which is what the shared process is for.

The device is one per host, named by a directory: every process that opens the same directory
shares it. A batch's launch part overlaps other batches running beside it; its per-image
part takes the SMs, one batch at a time host-wide: concurrency hides launch latency but adds
no arithmetic. ``exclusive`` (CUDA contexts without MPS time-slice the GPU): one process at a
time holds the device (a file lock), and only its own batches (its streams) run side by side;
after a time slice (2 ms x slowdown) it lets them finish and queues again. ``mps`` (NVIDIA
MPS): up to ``mps_limit`` batches of any processes side by side. The device keeps
host-wide counters in a small shared file: busy time (some batch on it), device time (each
batch's latency, summed), batches and images.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from .base import BackendError, BackendInfo
from .null import NullBackend

DeviceMode = Literal["exclusive", "mps"]
# Cited in the module docstring.
H100_RESNET50_FP16_LAUNCH_US = 400.0
H100_RESNET50_FP16_PER_IMAGE_US = 20.0
# Batch sizes are counted in power-of-two buckets: 1, 2-3, 4-7, ..., 128 and more.
BATCH_BUCKETS = ("1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128+")
# How long one process's context keeps the device while others may wait (CUDA time-slices
# contexts at about this grain); scaled with the model's slowdown.
_TIMESLICE_S = 0.002
_STATE_FIELDS = (
    "occupancy", "busy_since_ns", "busy_ns", "device_ns", "batches", "images",
    *(f"batches_{b}" for b in BATCH_BUCKETS),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """Batch latency = ``(launch_us + n * per_image_us) * slowdown`` (SIMULATED)."""

    launch_us: float = H100_RESNET50_FP16_LAUNCH_US
    per_image_us: float = H100_RESNET50_FP16_PER_IMAGE_US
    # > 1 makes the device slower, so that it, not the host's CPU, is the bottleneck.
    slowdown: float = 1.0

    def __post_init__(self) -> None:
        if self.launch_us < 0 or self.per_image_us < 0 or self.slowdown <= 0:
            raise ValueError(f"bad device model {self}")

    def latency_s(self, n: int) -> float:
        """Seconds a batch of ``n`` images holds the device."""
        return (self.launch_us + n * self.per_image_us) * self.slowdown / 1e6

    def launch_s(self) -> float:
        return self.launch_us * self.slowdown / 1e6


@dataclass(frozen=True, slots=True)
class DeviceTotals:
    """Host-wide counters of a simulated device since it was created."""

    busy_ns: int  # time with at least one batch on the device (measured)
    device_ns: int  # each batch's modelled latency, summed
    batches: int
    images: int
    by_size: tuple[int, ...] = ()  # batches in each of BATCH_BUCKETS


class SimulatedDevice:
    """One per host (per directory): the locks and counters all its processes share."""

    def __init__(self, directory: Path, *, mode: DeviceMode = "exclusive", mps_limit: int = 1):
        if mode not in ("exclusive", "mps"):
            raise ValueError(f"device mode must be exclusive or mps, got {mode!r}")
        if mps_limit < 1:
            raise ValueError(f"mps_limit must be at least 1, got {mps_limit}")
        self.directory = directory
        self.mode: DeviceMode = mode
        self.slots = 1 if mode == "exclusive" else mps_limit
        directory.mkdir(parents=True, exist_ok=True)
        # Lock files: one per concurrent batch slot, one for the per-image compute (shared by
        # every slot under MPS), one guarding the counters.
        self._slot_fds = [self._open(f"slot-{i}.lock") for i in range(self.slots)]
        self._compute_fd = self._open("compute.lock")
        self._state_fd = self._open("state")
        # flock excludes other processes only (it is per open file): threads of this process
        # take these first.
        self._slot_locks = [threading.Lock() for _ in range(self.slots)]
        self._compute_lock = threading.Lock()
        self._state_lock = threading.Lock()
        # Exclusive mode: this process's batches running, and since when it holds the device.
        self._context = threading.Condition()
        self._holders = 0
        self._held_since = 0.0
        self._draining = False
        size = 8 * len(_STATE_FIELDS)
        if os.fstat(self._state_fd).st_size < size:
            os.ftruncate(self._state_fd, size)
        self._map = mmap.mmap(self._state_fd, size)
        self._state = np.frombuffer(self._map, dtype=np.int64)

    def _open(self, name: str) -> int:
        return os.open(self.directory / name, os.O_RDWR | os.O_CREAT, 0o666)

    def run(self, model: DeviceModel, n: int) -> tuple[float, float]:
        """Hold the device as a batch of ``n`` images would; returns when it held it, as
        ``time.monotonic()`` start and end."""
        if self.mode == "exclusive":
            self._enter_context(model)
            try:
                return self._compute(model, n)
            finally:
                self._leave_context()
        index = self._take_slot()
        try:
            return self._compute(model, n)
        finally:
            fcntl.flock(self._slot_fds[index], fcntl.LOCK_UN)
            self._slot_locks[index].release()

    def _compute(self, model: DeviceModel, n: int) -> tuple[float, float]:
        """A batch on the device: its launch overlaps the other batches running (streams of
        one context, or MPS); its arithmetic takes the SMs, one batch at a time."""
        self._account(entering=True)
        started = time.monotonic()
        _sleep(model.launch_s())
        with self._compute_lock:
            fcntl.flock(self._compute_fd, fcntl.LOCK_EX)
            try:
                _sleep(model.latency_s(n) - model.launch_s())
            finally:
                fcntl.flock(self._compute_fd, fcntl.LOCK_UN)
        ended = time.monotonic()
        # Device time is the model's latency, not the sleep's (which the host's scheduler
        # stretches): the figure compared between designs must not carry that noise.
        self._account(entering=False, held_ns=round(model.latency_s(n) * 1e9), n=n)
        return started, ended

    def _enter_context(self, model: DeviceModel) -> None:
        """Exclusive mode: this process's context gets the device (a host-wide file lock held
        while any of its batches runs), so its own batches overlap, other processes' do not.
        After a time slice it lets its batches finish and queues again, as the GPU's
        time-slicing between contexts does, so no process starves the others."""
        timeslice = _TIMESLICE_S * model.slowdown
        with self._context:
            while self._draining or (
                self._holders and time.monotonic() - self._held_since > timeslice
            ):
                self._draining = self._holders > 0
                if not self._draining:
                    break
                self._context.wait()
            if self._holders == 0:
                fcntl.flock(self._slot_fds[0], fcntl.LOCK_EX)
                self._held_since = time.monotonic()
            self._holders += 1

    def _leave_context(self) -> None:
        with self._context:
            self._holders -= 1
            if self._holders == 0:
                fcntl.flock(self._slot_fds[0], fcntl.LOCK_UN)
                self._draining = False
                self._context.notify_all()

    def _take_slot(self) -> int:
        """Take a free batch slot (thread lock, then file lock); returns its index."""
        for index, fd in enumerate(self._slot_fds):
            if not self._slot_locks[index].acquire(blocking=False):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return index
            except BlockingIOError:
                self._slot_locks[index].release()
        # All busy: wait on one, chosen by process and thread so that waiters spread out.
        index = (os.getpid() + threading.get_ident()) % self.slots
        self._slot_locks[index].acquire()
        fcntl.flock(self._slot_fds[index], fcntl.LOCK_EX)
        return index

    def _account(self, *, entering: bool, held_ns: int = 0, n: int = 0) -> None:
        state = self._state
        with self._state_lock:
            self._update(state, entering=entering, held_ns=held_ns, n=n)

    def _update(self, state: NDArray[np.int64], *, entering: bool, held_ns: int, n: int) -> None:
        fcntl.flock(self._state_fd, fcntl.LOCK_EX)
        try:
            now = time.monotonic_ns()  # CLOCK_MONOTONIC: one clock for every process
            if entering:
                if state[0] == 0:
                    state[1] = now
                state[0] += 1
            else:
                state[0] -= 1
                if state[0] == 0:
                    state[2] += now - state[1]
                state[3] += held_ns
                state[4] += 1
                state[5] += n
                state[6 + min(len(BATCH_BUCKETS) - 1, max(n, 1).bit_length() - 1)] += 1
        finally:
            fcntl.flock(self._state_fd, fcntl.LOCK_UN)

    def record(self, n: int, held_ns: int) -> None:
        """Count a batch that ran elsewhere (a real GPU) for ``held_ns``: the counters only."""
        state = self._state
        with self._state_lock:
            fcntl.flock(self._state_fd, fcntl.LOCK_EX)
            try:
                if state[0] == 0:
                    state[2] += held_ns
                state[3] += held_ns
                state[4] += 1
                state[5] += n
                state[6 + min(len(BATCH_BUCKETS) - 1, max(n, 1).bit_length() - 1)] += 1
            finally:
                fcntl.flock(self._state_fd, fcntl.LOCK_UN)

    def totals(self) -> DeviceTotals:
        """The host-wide counters now (busy time includes a batch running now)."""
        state = self._state
        with self._state_lock:
            fcntl.flock(self._state_fd, fcntl.LOCK_EX)
            try:
                busy = int(state[2])
                if state[0] > 0:
                    busy += time.monotonic_ns() - int(state[1])
                by_size = tuple(int(x) for x in state[6:])
                return DeviceTotals(busy, int(state[3]), int(state[4]), int(state[5]), by_size)
            finally:
                fcntl.flock(self._state_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        del self._state
        self._map.close()
        for fd in (*self._slot_fds, self._compute_fd, self._state_fd):
            os.close(fd)


def _sleep(seconds: float) -> None:
    # time.sleep overshoots by tens of microseconds; finish the last stretch by spinning on
    # the clock so that short batches cost what the model says, not the scheduler's tick.
    end = time.monotonic() + seconds
    if seconds > 0.0002:
        time.sleep(seconds - 0.0002)
    while time.monotonic() < end:
        time.sleep(0)


class SimulatedBackend:
    """A backend on a :class:`SimulatedDevice`: NullBackend's answers, the model's latency.

    The answers are the null backend's (top-1 class = first byte of the image), so results stay
    checkable; the time is the device's. Figures from it are SIMULATED.
    """

    def __init__(
        self,
        device: SimulatedDevice,
        model: DeviceModel,
        *,
        max_batch: int,
        max_concurrent_batches: int = 1,
        input_size: int = 224,
    ) -> None:
        if max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be at least 1")
        self._device = device
        self._model = model
        self._answers = NullBackend(max_batch=max_batch, input_size=input_size)
        self._depth = max_concurrent_batches
        self._info = BackendInfo(name="simulated", precision="fp16", device="SIMULATED H100")

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def max_batch(self) -> int:
        return self._answers.max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return self._depth

    @property
    def device(self) -> SimulatedDevice:
        return self._device

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        """The null backend's rows, after holding the device for the batch's latency."""
        probabilities = self._answers.infer(images)  # validates like a real backend
        self._device.run(self._model, int(images.shape[0]))
        return probabilities

    def close(self) -> None:
        self._answers.close()


@dataclass(frozen=True, slots=True)
class SimulatedBackendFactory:
    """A picklable ``(onnx path) -> backend`` for the processes of a benchmark's server."""

    spec: str
    max_batch: int

    def __call__(self, _onnx_path: Path) -> SimulatedBackend:
        return open_simulated_backend(self.spec, max_batch=self.max_batch)


def open_simulated_backend(spec: str, *, max_batch: int) -> SimulatedBackend:
    """A backend from ``DIR[,mode=exclusive|mps][,mps_limit=K][,slowdown=X][,depth=D]``.

    The form the benchmark passes to its server processes; raises ValueError when malformed.
    """
    directory, *options = spec.split(",")
    values: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("mode", "mps_limit", "slowdown", "depth"):
            raise ValueError(f"bad simulated device option {option!r}")
        values[key] = value
    mode = values.get("mode", "exclusive")
    if mode not in ("exclusive", "mps"):
        raise ValueError(f"device mode must be exclusive or mps, got {mode!r}")
    device = SimulatedDevice(
        Path(directory),
        mode="mps" if mode == "mps" else "exclusive",
        mps_limit=int(values.get("mps_limit", "1")),
    )
    model = DeviceModel(slowdown=float(values.get("slowdown", "1")))
    try:
        return SimulatedBackend(
            device, model, max_batch=max_batch, max_concurrent_batches=int(values.get("depth", "1"))
        )
    except (ValueError, BackendError):
        device.close()
        raise
