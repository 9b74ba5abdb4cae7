"""Strict fakes of ``tensorrt`` and ``pycuda.driver`` for device-free tests.

They fail where a GPU would, rather than only recording calls:

* Work is asynchronous. Copies and engine executions are queued on their stream and run only
  when that stream is synchronized, so results read before ``Stream.synchronize`` are not there.
* A host buffer enqueued for a copy is poisoned until its stream syncs: an input buffer turns
  read-only (writing the next batch into it raises), an output buffer is filled with NaN.
* Host memory given to async copies must be page-locked: from ``pagelocked_empty``, or
  registered in place with ``register_host_memory`` (and not unregistered since); a copy from
  any other host memory raises, as a real async copy from pageable memory would silently
  stage it through a synchronous host copy. Every host-to-device copy's source is logged
  (``FakeDriver.h2d_sources``: which kind of pinned memory, where, how many bytes). Every call
  that touches the device needs a current context, and copies must name a stream.
* ``set_tensor_address`` and ``execute_async_v3`` take plain integers only (a pycuda object
  raises TypeError, as pybind11 does); ``set_input_shape`` refuses shapes outside the profile.
* ``create_timing_cache`` can return None; the TensorRT 11 fake has only the flags 11.x has.
* TensorRT keeps the first logger it is given: later ones are recorded as ignored.
* Contexts are counted like the driver's: ``make_context`` makes a new one, while
  ``retain_primary_context`` and TensorRT's builder and runtime on a thread with no current
  context (the CUDA runtime's rule) share the device's one primary context.
* Every queued copy and execution lands on a device timeline (``FakeDriver.timeline``) with
  simulated start and end ticks: one engine each for host-to-device copies, compute and
  device-to-host copies, each op after its stream's previous one, and none before the host
  queued it, where the host's clock moves only when it waits (``Stream.synchronize``). Whether
  copies and compute of consecutive batches overlap is read from it, never from wall time.

The fake engine's answer is a one-hot at (sum of the image's bytes) % 1000, so a test can tell
whether each image's row came back in the right place.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

INPUT_SHAPE = [-1, 224, 224, 3]
NON_STICKY = "cuStreamSynchronize failed: invalid argument"
STICKY = "cuStreamSynchronize failed: an illegal memory access was encountered"


def expected_class(images: NDArray[np.uint8]) -> NDArray[np.int64]:
    """The fake engine's top-1 for each image."""
    sums: NDArray[np.int64] = images.reshape(images.shape[0], -1).sum(axis=1, dtype=np.int64)
    return sums % 1000


# --- pycuda.driver ---------------------------------------------------------------------------


class FakeCudaError(Exception):
    """Stands in for pycuda.driver.Error."""


# Simulated device durations, in ticks: a host-to-device copy of one image takes one tick,
# computing a batch 2 ticks plus 3 per image (ResNet-50 is compute-bound), the copy back of one
# image's probabilities a tenth of a tick.
IMAGE_BYTES = 224 * 224 * 3
H2D_TICKS_PER_BYTE = 1.0 / IMAGE_BYTES
D2H_TICKS_PER_BYTE = 0.1 / (1000 * 4)
EXEC_TICKS_FIXED = 2.0
EXEC_TICKS_PER_IMAGE = 3.0


@dataclass(frozen=True, slots=True)
class DeviceOp:
    """One op on the fake device's timeline: which stream, what, and when (in ticks)."""

    stream: int
    kind: str  # "h2d", "execute" or "d2h"
    start: float
    end: float
    images: int  # batch size for "execute"; 0 for copies

    def overlaps(self, other: DeviceOp) -> bool:
        """Whether the two ops ran at the same time for a positive stretch."""
        return min(self.end, other.end) > max(self.start, other.start)


class FakeLibCuda:
    """The two libcuda entry points the backend calls through ctypes (pycuda wraps neither)."""

    def __init__(self, driver: FakeDriver) -> None:
        self._driver = driver

    def cuDeviceGet(self, device: Any, ordinal: int) -> int:  # noqa: N802 (CUDA's name)
        if not 0 <= ordinal < self._driver.Device.count():
            return 101  # CUDA_ERROR_INVALID_DEVICE
        device._obj.value = ordinal  # ctypes.byref(c_int)
        return 0

    def cuDevicePrimaryCtxSetFlags_v2(self, device: Any, flags: Any) -> int:  # noqa: N802
        if not isinstance(device, ctypes.c_int) or not isinstance(flags, ctypes.c_uint):
            raise ctypes.ArgumentError("expected c_int device and c_uint flags")
        self._driver.primary_flags = flags.value
        return 0


class _HostBuffer(np.ndarray[Any, Any]):
    freed = False

    def free(self) -> None:
        self.freed = True


@dataclass(frozen=True, slots=True)
class HostSource:
    """The host memory one host-to-device copy read."""

    kind: str  # "pagelocked" (pagelocked_empty) or "registered" (register_host_memory)
    address: int
    nbytes: int


class _Registration:
    """What pycuda's register_host_memory returns as its array's ``.base``: the registration,
    with ``unregister()``. The array is built from it (``__array_interface__``), as pycuda's."""

    def __init__(self, driver: FakeDriver, array: NDArray[np.uint8]) -> None:
        self._driver = driver
        self.array = array  # keeps the memory alive while registered, as the real one does
        self.start, self.end = np.lib.array_utils.byte_bounds(array)
        self.active = True

    @property
    def __array_interface__(self) -> dict[str, Any]:
        return {
            "shape": (self.end - self.start,),
            "typestr": "|u1",
            "data": (self.start, False),
            "version": 3,
        }

    def unregister(self) -> None:
        driver = self._driver
        driver._record("RegisteredHostMemory.unregister")
        driver._require_context("RegisteredHostMemory.unregister")
        if not self.active:
            raise FakeCudaError("cuMemHostUnregister failed: host memory not registered")
        self.active = False
        driver.registrations.remove(self)


class FakeDriver(types.ModuleType):
    """A fake pycuda.driver: device memory is a dict of bytearrays keyed by fake address."""

    Error = FakeCudaError
    ctx_flags = types.SimpleNamespace(
        SCHED_AUTO=0, SCHED_SPIN=1, SCHED_YIELD=2, SCHED_BLOCKING_SYNC=4
    )
    mem_host_register_flags = types.SimpleNamespace(PORTABLE=1, DEVICEMAP=2)

    def __init__(self) -> None:
        super().__init__("pycuda.driver")
        self.memory: dict[int, bytearray] = {}
        self.freed: list[int] = []
        # call name -> the message its FakeCudaError carries (pycuda's wording).
        self.fail_on: dict[str, str] = {}
        self.calls: list[str] = []
        self.contexts_detached = 0
        self.context_flags: list[int] = []
        # Every context that came to exist in this process (the primary one at most once).
        self.contexts: list[Any] = []
        self.primary: Any = None
        self.primary_flags = 0  # what cuDevicePrimaryCtxSetFlags last set (0: SCHED_AUTO)
        self.primary_refs = 0
        self.libcuda = FakeLibCuda(self)
        self.timeline: list[DeviceOp] = []
        self.host_time = 0.0
        self._engine_free = {"h2d": 0.0, "execute": 0.0, "d2h": 0.0}
        # When set, the first host-to-device copy waits for it: a test queues all its batches
        # meanwhile, so what overlaps depends on the backend alone, not on thread timing.
        self.hold: threading.Event | None = None
        self.streams: dict[int, Any] = {}
        self._pinned: dict[int, NDArray[Any]] = {}  # id(root array) -> root array
        self.registrations: list[_Registration] = []  # host memory registered now
        self.h2d_sources: list[HostSource] = []
        self._poison: dict[int, int] = {}  # id(root array) -> pending copies using it
        self._addresses = itertools.count(0x1000, 0x100000)
        self._handles = itertools.count(0x7F00)
        self._local = threading.local()
        driver = self

        class Device:
            def __init__(self, index: int) -> None:
                self.index = index

            @staticmethod
            def count() -> int:
                return 1

            def name(self) -> str:
                return "Fake GPU 9000"

            def compute_capability(self) -> tuple[int, int]:
                return (8, 9)

            def make_context(self, flags: int = 0) -> Any:
                driver._record("Device.make_context")
                context = _Context(flags)
                driver.contexts.append(context)
                driver.context_flags.append(flags)
                driver._stack().append(context)
                return context

            def retain_primary_context(self) -> Any:
                driver._record("Device.retain_primary_context")
                primary = driver.primary_context()
                driver.primary_refs += 1
                return primary

        class _Context:
            def __init__(self, flags: int, primary: bool = False) -> None:
                self._flags = flags
                self.primary = primary

            @property
            def flags(self) -> int:
                # A primary context runs with whatever flags were last set for it.
                return driver.primary_flags if self.primary else self._flags

            def push(self) -> None:
                driver._record("Context.push")
                driver._stack().append(self)

            def detach(self) -> None:
                driver._record("Context.detach")
                if self in driver._stack():
                    raise FakeCudaError("detach of a context still current on this thread")
                if self.primary:
                    if driver.primary_refs <= 0:
                        raise FakeCudaError("cuDevicePrimaryCtxRelease: not retained")
                    driver.primary_refs -= 1
                driver.contexts_detached += 1

        class Context:
            @staticmethod
            def pop() -> None:
                driver._record("Context.pop")
                if not driver._stack():
                    raise FakeCudaError("cuCtxPopCurrent failed: invalid device context")
                driver._stack().pop()

        class Stream:
            def __init__(self, flags: int = 0) -> None:
                driver._record("Stream")
                driver._require_context("Stream")
                self.flags = flags
                self.handle = next(driver._handles)
                self.queued: list[Callable[[], None]] = []
                self.poisoned: list[int] = []
                self.last_end = 0.0  # when the last op queued here ends on the device
                driver.streams[self.handle] = self

            def synchronize(self) -> None:
                # The host waits until everything queued here has run.
                driver.host_time = max(driver.host_time, self.last_end)
                work, self.queued = self.queued, []
                poisoned, self.poisoned = self.poisoned, []
                try:
                    driver._record("Stream.synchronize")
                    driver._require_context("Stream.synchronize")
                    for step in work:
                        step()
                finally:
                    for root in poisoned:
                        driver._release(root)

        class _Allocation:
            def __init__(self, address: int) -> None:
                self.address = address

            def __int__(self) -> int:
                return self.address

            def free(self) -> None:
                driver.freed.append(self.address)

        self.Device = Device
        self.Context = Context
        self._ContextClass = _Context
        self.Stream = Stream
        self._Allocation = _Allocation

    def primary_context(self) -> Any:
        """The device's primary context, created (and counted) the first time it is used."""
        if self.primary is None:
            self.primary = self._ContextClass(0, primary=True)
            self.contexts.append(self.primary)
        return self.primary

    def runtime_context(self) -> Any:
        """The context the CUDA runtime (TensorRT) uses on this thread: the current one, else
        the primary context, which it retains and makes current (cudart's rule)."""
        stack = self._stack()
        if not stack:
            stack.append(self.primary_context())
        return stack[-1]

    def _schedule(self, stream: Any, kind: str, ticks: float, images: int = 0) -> None:
        """Put one op on the device timeline: after the stream's previous op, after the host
        queued it and once its engine (h2d copy, compute, d2h copy) is free."""
        start = max(self.host_time, stream.last_end, self._engine_free[kind])
        end = start + ticks
        stream.last_end = end
        self._engine_free[kind] = end
        self.timeline.append(DeviceOp(stream.handle, kind, start, end, images))

    def _stack(self) -> list[Any]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        stack: list[Any] = self._local.stack
        return stack

    def _record(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail_on:
            raise FakeCudaError(self.fail_on[name])

    def _require_context(self, name: str) -> None:
        if not self._stack():
            raise FakeCudaError(f"{name} failed: invalid device context (none is current)")

    def _root(self, array: NDArray[Any], name: str) -> NDArray[Any] | None:
        """The pagelocked_empty array ``array`` lies in (None: it lies in registered memory);
        raises if it is neither pinned nor registered now, or not contiguous."""
        if not array.flags.c_contiguous:
            raise FakeCudaError(f"{name}: host buffer is not contiguous")
        lo, hi = np.lib.array_utils.byte_bounds(array)
        for root in self._pinned.values():
            root_lo, root_hi = np.lib.array_utils.byte_bounds(root)
            if root_lo <= lo and hi <= root_hi:
                return root
        if any(r.start <= lo and hi <= r.end for r in self.registrations):
            return None
        raise FakeCudaError(
            f"{name}: host memory is not page-locked (pagelocked_empty or register_host_memory)"
        )

    def register_host_memory(self, array: NDArray[Any], flags: int = 0) -> NDArray[Any]:
        """Page-lock existing host memory in place: the returned array shares it, and its
        ``.base`` is the registration (``unregister()``)."""
        self._record("register_host_memory")
        self._require_context("register_host_memory")
        if type(flags) is not int or flags & ~3:
            raise FakeCudaError(f"cuMemHostRegister failed: invalid flags {flags!r}")
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous or not array.nbytes:
            raise FakeCudaError("cuMemHostRegister failed: not a contiguous host buffer")
        registration = _Registration(self, array)
        for other in self.registrations:
            if registration.start < other.end and other.start < registration.end:
                raise FakeCudaError("cuMemHostRegister failed: host memory already registered")
        self.registrations.append(registration)
        registered: NDArray[Any] = np.asarray(registration)
        return registered

    def _poison_root(self, root: NDArray[Any], stream: Any) -> None:
        key = id(root)
        self._poison[key] = self._poison.get(key, 0) + 1
        root.flags.writeable = False
        stream.poisoned.append(key)

    def _release(self, key: int) -> None:
        self._poison[key] -= 1
        if self._poison[key] == 0:
            del self._poison[key]
            self._pinned[key].flags.writeable = True

    def _stream(self, stream: Any, name: str) -> Any:
        if not isinstance(stream, self.Stream):
            raise FakeCudaError(f"{name}: expected a pycuda Stream, got {stream!r}")
        return stream

    def enqueue(self, handle: int, step: Callable[[], None], images: int) -> bool:
        """Queue an engine execution of ``images`` images (``step``) on the stream whose raw
        handle is ``handle`` (for the fake engine)."""
        stream = self.streams.get(handle)
        if stream is None:
            return False
        self._schedule(stream, "execute", EXEC_TICKS_FIXED + EXEC_TICKS_PER_IMAGE * images, images)
        stream.queued.append(step)
        return True

    def init(self) -> None:
        self._record("init")

    def mem_alloc(self, nbytes: int) -> Any:
        self._record("mem_alloc")
        self._require_context("mem_alloc")
        address = next(self._addresses)
        self.memory[address] = bytearray(nbytes)
        return self._Allocation(address)

    def pagelocked_empty(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> NDArray[Any]:
        self._record("pagelocked_empty")
        self._require_context("pagelocked_empty")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        # Like pycuda: the array's .base is the host allocation, which has free().
        root = np.zeros(nbytes, np.uint8).view(_HostBuffer).view(dtype).reshape(shape)
        self._pinned[id(root)] = root
        return root

    def memcpy_htod_async(self, dst: Any, src: NDArray[Any], stream: Any) -> None:
        self._record("memcpy_htod_async")
        self._require_context("memcpy_htod_async")
        if self.hold is not None:
            hold, self.hold = self.hold, None
            if not hold.wait(timeout=60):
                raise FakeCudaError("memcpy_htod_async: the test never released its hold")
        stream = self._stream(stream, "memcpy_htod_async")
        root = self._root(src, "memcpy_htod_async")
        address, nbytes = int(dst), src.nbytes
        kind = "registered" if root is None else "pagelocked"
        source_address = int(src.__array_interface__["data"][0])
        self.h2d_sources.append(HostSource(kind, source_address, nbytes))
        offset = 0
        if address not in self.memory:  # an address inside an allocation: copy at an offset
            base = max(a for a in self.memory if a <= address)
            address, offset = base, address - base

        if offset + nbytes > len(self.memory[address]):
            raise FakeCudaError("memcpy_htod_async: copy past the end of the device allocation")

        def copy() -> None:
            self.memory[address][offset : offset + nbytes] = src.tobytes()

        self._schedule(stream, "h2d", nbytes * H2D_TICKS_PER_BYTE)
        stream.queued.append(copy)
        if root is not None:
            self._poison_root(root, stream)

    def memcpy_dtoh_async(self, dst: NDArray[Any], src: Any, stream: Any) -> None:
        self._record("memcpy_dtoh_async")
        self._require_context("memcpy_dtoh_async")
        stream = self._stream(stream, "memcpy_dtoh_async")
        root = self._root(dst, "memcpy_dtoh_async")
        if root is None:
            raise FakeCudaError("memcpy_dtoh_async: the backend never copies into shared memory")
        address = int(src)
        if np.issubdtype(dst.dtype, np.floating):
            dst[...] = np.nan  # what a reader sees before the stream is synchronized

        def copy() -> None:
            raw = bytes(self.memory[address][: dst.nbytes])
            dst[...] = np.frombuffer(raw, dst.dtype).reshape(dst.shape)

        self._schedule(stream, "d2h", dst.nbytes * D2H_TICKS_PER_BYTE)
        stream.queued.append(copy)
        self._poison_root(root, stream)


# --- tensorrt --------------------------------------------------------------------------------


class _Enum:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


def _enum(*names: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{n: _Enum(n, i) for i, n in enumerate(names)})


# TensorRT 10.x's weak-typing flags; 11.x removed them (strong typing only).
_PRECISION_FLAGS = (
    "FP16",
    "BF16",
    "INT8",
    "FP8",
    "INT4",
    "FP4",
    "OBEY_PRECISION_CONSTRAINTS",
    "PREFER_PRECISION_CONSTRAINTS",
    "DIRECT_IO",
)
_OTHER_FLAGS = ("TF32", "REFIT", "SPARSE_WEIGHTS", "GPU_FALLBACK", "DEBUG", "STRIP_PLAN")


def make_fake_trt(version: str, *, strongly_typed_flag: bool = True) -> Any:
    """A fake ``tensorrt`` module of the given version; state lives on the module object.

    Set ``trt.driver`` to a FakeDriver before running engines: executions are queued on its
    streams. ``strongly_typed_flag=False`` models a 10.x too old to have STRONGLY_TYPED.
    """
    trt: Any = types.ModuleType("tensorrt")
    trt.__version__ = version
    major = int(version.split(".")[0])
    trt.events = []
    trt.parser_errors = []
    trt.fail_build = False
    trt.fail_create = set()  # "Builder" / "Runtime": their construction fails
    trt.timing_cache_unreadable = False  # create_timing_cache(non-empty) returns None
    trt.no_timing_cache = False  # create_timing_cache always returns None
    trt.parsed_model = None
    trt.driver = None
    # execute(stream_handle, batch, images_address, probabilities_address) -> bool, when set,
    # runs the engine instead of the fake driver's queue (the cuda suite's real kernel).
    trt.execute = None
    trt.created = []  # (kind, logger) for each Builder / Runtime / OnnxParser
    trt.first_logger = None
    trt.ignored_loggers = []

    class Severity:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = (
            _Enum(n, i)
            for i, n in enumerate(["INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"])
        )

    class ILogger:
        def __init__(self) -> None:
            pass

    ILogger.Severity = Severity  # type: ignore[attr-defined]
    trt.ILogger = ILogger

    class Logger(ILogger):
        def log(self, severity: _Enum, msg: str) -> None:
            pass

    trt.Logger = Logger

    def take_logger(kind: str, logger: Any) -> None:
        if not isinstance(logger, ILogger):
            raise TypeError(f"{kind}(): incompatible function arguments (logger {logger!r})")
        if kind in trt.fail_create:
            raise TypeError(f"pybind11::init(): factory function returned nullptr ({kind})")
        trt.created.append((kind, logger))
        if trt.driver is not None and kind in ("Builder", "Runtime"):
            trt.driver.runtime_context()  # the CUDA runtime starts on the first TensorRT object
        if trt.first_logger is None:
            trt.first_logger = logger
        elif logger is not trt.first_logger:
            trt.ignored_loggers.append((kind, logger))

    class IProgressMonitor:
        def __init__(self) -> None:
            pass

    trt.IProgressMonitor = IProgressMonitor
    if major >= 11:
        # 11.x: STRONGLY_TYPED is kept (deprecated, ignored) and renumbered; no EXPLICIT_BATCH.
        trt.NetworkDefinitionCreationFlag = _enum(
            "STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"
        )
        trt.BuilderFlag = _enum(*_OTHER_FLAGS)
    else:
        names = ["EXPLICIT_BATCH", "STRONGLY_TYPED"] if strongly_typed_flag else ["EXPLICIT_BATCH"]
        trt.NetworkDefinitionCreationFlag = _enum(*names)
        trt.BuilderFlag = _enum(*_PRECISION_FLAGS, *_OTHER_FLAGS)
    valid_network_flags = sum(
        1 << v.value for v in vars(trt.NetworkDefinitionCreationFlag).values()
    )
    trt.MemoryPoolType = _enum("WORKSPACE")
    trt.ProfilingVerbosity = _enum("LAYER_NAMES_ONLY", "NONE", "DETAILED")
    trt.DataType = types.SimpleNamespace(
        FLOAT=_Enum("FLOAT", 0), HALF=_Enum("HALF", 1), UINT8=_Enum("UINT8", 5)
    )
    trt.TensorIOMode = types.SimpleNamespace(INPUT=_Enum("INPUT", 1), OUTPUT=_Enum("OUTPUT", 2))
    onnx_to_trt: dict[int, _Enum] = {
        onnx.TensorProto.UINT8: trt.DataType.UINT8,
        onnx.TensorProto.FLOAT: trt.DataType.FLOAT,
        onnx.TensorProto.FLOAT16: trt.DataType.HALF,
    }

    class Dims(list):  # type: ignore[type-arg]
        pass

    trt.Dims = Dims

    class _Tensor:
        def __init__(self, name: str, dtype: _Enum) -> None:
            self.name, self.dtype = name, dtype

    class _Network:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.inputs: list[_Tensor] = []
            self.outputs: list[_Tensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> _Tensor:
            return self.inputs[i]

        def get_output(self, i: int) -> _Tensor:
            return self.outputs[i]

    class _ParserError:
        def __init__(self, node: str, op: str, desc: str) -> None:
            self._node, self._op, self._desc = node, op, desc

        def node_name(self) -> str:
            return self._node

        def node_operator(self) -> str:
            return self._op

        def desc(self) -> str:
            return self._desc

        def code(self) -> str:
            return "UNSUPPORTED_NODE"

    class OnnxParser:
        def __init__(self, network: _Network, logger: Any) -> None:
            take_logger("OnnxParser", logger)
            self.network = network
            self.errors: list[_ParserError] = []

        def parse(self, data: bytes) -> bool:
            model = onnx.ModelProto.FromString(data)
            trt.parsed_model = model
            if trt.parser_errors:
                self.errors = [_ParserError(*e) for e in trt.parser_errors]
                return False

            def tensor(vi: onnx.ValueInfoProto) -> _Tensor:
                return _Tensor(vi.name, onnx_to_trt[vi.type.tensor_type.elem_type])

            self.network.inputs = [tensor(vi) for vi in model.graph.input]
            self.network.outputs = [tensor(vi) for vi in model.graph.output]
            return True

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> _ParserError:
            return self.errors[i]

    trt.OnnxParser = OnnxParser

    class _Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

        def set_shape(self, name: str, lo: Dims, opt: Dims, hi: Dims) -> None:
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class _TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = bytes(data)

        def serialize(self) -> bytes:
            return self.data + b"+timed"

        def combine(self, other: _TimingCache, ignore_mismatch: bool) -> bool:
            self.data = other.data + b"&" + self.data
            return True

    class _Config:
        def __init__(self) -> None:
            self.pools: dict[str, int] = {}
            self.flags: set[str] = set()
            self.builder_optimization_level = -1
            self.profiling_verbosity = trt.ProfilingVerbosity.LAYER_NAMES_ONLY
            self.profiles: list[_Profile] = []
            self.timing_cache: _TimingCache | None = None
            self.progress_monitor: Any = None

        def set_memory_pool_limit(self, pool: _Enum, size: int) -> None:
            self.pools[pool.name] = size

        def set_flag(self, flag: _Enum) -> None:
            self.flags.add(flag.name)

        def add_optimization_profile(self, profile: _Profile) -> int:
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes) -> _TimingCache | None:
            if trt.no_timing_cache or (data and trt.timing_cache_unreadable):
                return None
            return _TimingCache(data)

        def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
            if not isinstance(cache, _TimingCache):
                raise TypeError(f"set_timing_cache(): incompatible function arguments ({cache!r})")
            self.timing_cache = cache
            return True

        def get_timing_cache(self) -> _TimingCache | None:
            return self.timing_cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            take_logger("Builder", logger)
            self.logger = logger

        def create_network(self, flags: int = 0) -> _Network:
            if flags & ~valid_network_flags:
                raise ValueError(f"create_network: unknown creation flags {flags:#x}")
            trt.events.append(("create_network", flags))
            return _Network(flags)

        def create_builder_config(self) -> _Config:
            return _Config()

        def create_optimization_profile(self) -> _Profile:
            return _Profile()

        def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
            trt.events.append(("build", network, config))
            if trt.fail_build:
                return None
            (profile,) = config.profiles
            max_batch = profile.shapes["images"][2][0]
            return b"PLAN" + max_batch.to_bytes(4, "little")

    trt.Builder = Builder

    class _ExecutionContext:
        def __init__(self, engine: _Engine) -> None:
            self.engine = engine
            self.shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}
            self.streams: list[int] = []

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            shape = tuple(shape)
            if len(shape) != len(hi) or not all(
                a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)
            ):
                return False  # TensorRT logs an error and refuses
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name: str, address: int) -> bool:
            if type(address) is not int:
                raise TypeError(
                    f"set_tensor_address(): incompatible function arguments {address!r}"
                )
            if name not in self.engine.io:
                return False
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            if type(stream_handle) is not int:
                raise TypeError(
                    f"execute_async_v3(): incompatible function arguments {stream_handle!r}"
                )
            if set(self.addresses) != set(self.engine.io) or "images" not in self.shapes:
                return False
            n = self.shapes["images"][0]
            images_at, probs_at = self.addresses["images"], self.addresses["probabilities"]
            self.streams.append(stream_handle)
            if trt.execute is not None:
                return bool(trt.execute(stream_handle, n, images_at, probs_at))
            memory = trt.driver.memory

            def run() -> None:
                raw = bytes(memory[images_at][: n * 224 * 224 * 3])
                images = np.frombuffer(raw, np.uint8).reshape(n, 224, 224, 3)
                out = np.zeros((n, 1000), np.float32)
                out[np.arange(n), expected_class(images)] = 1.0
                memory[probs_at][: out.nbytes] = out.tobytes()

            return bool(trt.driver.enqueue(stream_handle, run, n))

    class _Engine:
        def __init__(self, max_batch: int) -> None:
            self.max_batch = max_batch
            self.io = {
                "images": (trt.TensorIOMode.INPUT, trt.DataType.UINT8, INPUT_SHAPE),
                "probabilities": (trt.TensorIOMode.OUTPUT, trt.DataType.FLOAT, [-1, 1000]),
            }
            self.contexts: list[_ExecutionContext] = []

        @property
        def num_io_tensors(self) -> int:
            return len(self.io)

        def get_tensor_name(self, i: int) -> str:
            return list(self.io)[i]

        def get_tensor_mode(self, name: str) -> _Enum:
            mode: _Enum = self.io[name][0]
            return mode

        def get_tensor_dtype(self, name: str) -> _Enum:
            dtype: _Enum = self.io[name][1]
            return dtype

        def get_tensor_shape(self, name: str) -> Dims:
            return Dims(self.io[name][2])

        def get_tensor_profile_shape(self, name: str, profile: int) -> list[Dims]:
            rest = INPUT_SHAPE[1:]
            return [Dims([1, *rest]), Dims([self.max_batch, *rest]), Dims([self.max_batch, *rest])]

        def create_execution_context(self) -> _ExecutionContext:
            context = _ExecutionContext(self)
            self.contexts.append(context)
            return context

    class Runtime:
        def __init__(self, logger: Any) -> None:
            take_logger("Runtime", logger)
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
            if not plan.startswith(b"PLAN"):
                return None
            engine = _Engine(int.from_bytes(plan[4:8], "little"))
            trt.engine = engine
            return engine

    trt.Runtime = Runtime
    trt._Engine = _Engine
    return trt
