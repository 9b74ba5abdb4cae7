"""The one place that touches pycuda: a small typed wrapper over its driver API.

pycuda has no type information and raises its own exception classes; everything here is typed,
and every driver failure becomes a ``CudaError`` naming the pycuda call that failed. pycuda is
imported on first use, never at module import.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from numpy.typing import DTypeLike, NDArray

from ..base import BackendUnavailableError
from .errors import CudaError, StickyCudaError

T = TypeVar("T")

_initialized = False

# cuStreamCreate's CU_STREAM_NON_BLOCKING (pycuda has no name for it): the stream does not
# synchronize with the legacy default stream, so work there cannot serialize our two slots.
STREAM_NON_BLOCKING = 1

# Errors after which the context is unusable (CUDA's "sticky" errors), as cuGetErrorString words
# them (pycuda's message) and by enum name. Any other error fails only the call that raised it.
_STICKY_ERRORS = (
    "illegal memory access",
    "illegal_address",
    "unspecified launch failure",
    "launch_failed",
    "illegal instruction",
    "illegal_instruction",
    "misaligned address",
    "misaligned_address",
    "hardware stack error",
    "hardware_stack_error",
    "invalid program counter",
    "invalid_pc",
    "device-side assert",
    "error_assert",
    "uncorrectable ecc",
    "ecc_uncorrectable",
    "launch timed out",
    "launch_timeout",
)


def is_sticky(message: str) -> bool:
    """Whether a CUDA error message names an error that poisons the context."""
    lowered = message.lower()
    return any(marker in lowered for marker in _STICKY_ERRORS)


def _driver() -> Any:
    """pycuda.driver, imported lazily; typed Any because pycuda ships no annotations."""
    try:
        return importlib.import_module("pycuda.driver")
    except ImportError as exc:
        raise BackendUnavailableError(f"pycuda could not be imported: {exc}") from exc


def _call(name: str, fn: Callable[..., T], *args: Any) -> T:
    """Run one pycuda call, turning its driver errors into CudaError(name)."""
    drv = _driver()
    try:
        return fn(*args)
    except drv.Error as exc:
        detail = str(exc) or type(exc).__name__
        kind = StickyCudaError if is_sticky(detail) else CudaError
        raise kind(f"pycuda.driver.{name}", detail) from exc


def init() -> None:
    """Initialise the CUDA driver (cuInit) once per process."""
    global _initialized
    if not _initialized:
        _call("init", _driver().init)
        _initialized = True


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Identity of one GPU, as the engine cache keys it."""

    index: int
    name: str
    compute_capability: tuple[int, int]


def device_info(index: int = 0) -> DeviceInfo:
    """Name and compute capability of device ``index`` (no context needed)."""
    init()
    drv = _driver()
    count = int(_call("Device.count", drv.Device.count))
    if not 0 <= index < count:
        raise CudaError("pycuda.driver.Device", f"device {index} requested, {count} present")
    dev = _call("Device", drv.Device, index)
    name = str(_call("Device.name", dev.name))
    major, minor = _call("Device.compute_capability", dev.compute_capability)
    return DeviceInfo(index=index, name=name, compute_capability=(int(major), int(minor)))


class CudaContext:
    """The device's primary context with blocking synchronization, current on this thread.

    One context per process: TensorRT's builder and runtime (the CUDA runtime) use the device's
    *primary* context on any thread where none is current, e.g. the availability check and the
    engine build. A context of our own (``make_context``) made a second one, with its own
    device memory and its own copy of every module. So the worker retains the primary context
    and pushes it; everything in the process then shares it.

    ``SCHED_BLOCKING_SYNC``: a thread waiting in ``synchronize`` sleeps on an interrupt instead
    of spinning a core, which the server's gRPC threads need. pycuda cannot set a primary
    context's flags, so they are set through the driver library (``cuDevicePrimaryCtxSetFlags``,
    which since CUDA 11 also applies to an active primary context).
    """

    def __init__(self, index: int = 0) -> None:
        init()
        drv = _driver()
        dev = _call("Device", drv.Device, index)
        set_primary_context_flags(index, int(drv.ctx_flags.SCHED_BLOCKING_SYNC))
        self._ctx: Any = _call("Device.retain_primary_context", dev.retain_primary_context)
        # Retaining does not make the context current; push it on this (the worker's) thread.
        _call("Context.push", self._ctx.push)
        self._active = True

    def close(self) -> None:
        """Pop the context from this thread and release our hold on it (detach); idempotent."""
        if not self._active:
            return
        self._active = False
        drv = _driver()
        _call("Context.pop", drv.Context.pop)
        _call("Context.detach", self._ctx.detach)


def _libcuda() -> Any:
    """The CUDA driver library (ctypes), for the calls pycuda does not wrap."""
    from .availability import load_libcuda

    lib = load_libcuda()
    if lib is None:
        raise CudaError("libcuda", "the CUDA driver library could not be loaded")
    return lib


def set_primary_context_flags(index: int, flags: int) -> None:
    """cuDevicePrimaryCtxSetFlags(device ``index``, ``flags``) through the driver library."""
    import ctypes

    lib = _libcuda()
    device = ctypes.c_int(0)
    status = int(lib.cuDeviceGet(ctypes.byref(device), index))
    if status != 0:
        raise CudaError("cuDeviceGet", f"CUDA error {status} for device {index}")
    # The _v2 entry point is the one cuda.h maps the name to since CUDA 11.
    status = int(lib.cuDevicePrimaryCtxSetFlags_v2(device, ctypes.c_uint(flags)))
    if status != 0:
        raise CudaError("cuDevicePrimaryCtxSetFlags", f"CUDA error {status} (flags {flags:#x})")


class CudaStream:
    """A non-blocking CUDA stream; ``handle`` is what TensorRT's execute_async_v3 takes."""

    def __init__(self) -> None:
        self._stream: Any = _call("Stream", _driver().Stream, STREAM_NON_BLOCKING)

    @property
    def handle(self) -> int:
        """The raw cudaStream_t as an int."""
        return int(self._stream.handle)

    @property
    def raw(self) -> Any:
        """The pycuda Stream, for the async copies below."""
        return self._stream

    def synchronize(self) -> None:
        """Block until all work queued on the stream is done (surfaces async errors)."""
        _call("Stream.synchronize", self._stream.synchronize)


class DeviceBuffer:
    """Linear device memory of a fixed size, freed explicitly by ``free``."""

    def __init__(self, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"device buffer size must be positive, got {nbytes}")
        self.nbytes = nbytes
        self._alloc: Any = _call("mem_alloc", _driver().mem_alloc, nbytes)

    @property
    def address(self) -> int:
        """Device pointer as an int, for set_tensor_address."""
        if self._alloc is None:
            raise CudaError("pycuda.driver.DeviceAllocation", "buffer already freed")
        return int(self._alloc)

    def free(self) -> None:
        """Release the memory now rather than whenever the GC runs; idempotent."""
        if self._alloc is not None:
            alloc, self._alloc = self._alloc, None
            _call("DeviceAllocation.free", alloc.free)


class PinnedArray:
    """A page-locked host array: the only kind of host memory async copies can overlap with."""

    def __init__(self, shape: tuple[int, ...], dtype: DTypeLike) -> None:
        self._array: NDArray[Any] | None = _call(
            "pagelocked_empty", _driver().pagelocked_empty, shape, np.dtype(dtype)
        )

    @property
    def array(self) -> NDArray[Any]:
        """The numpy view of the pinned memory (invalid after ``free``)."""
        if self._array is None:
            raise CudaError("pycuda.driver.HostAllocation", "pinned buffer already freed")
        return self._array

    def free(self) -> None:
        """Unpin and release the host memory; idempotent."""
        if self._array is not None:
            array, self._array = self._array, None
            # pagelocked_empty's array is a view of a pycuda HostAllocation (its .base).
            host_allocation: Any = array.base
            _call("HostAllocation.free", host_allocation.free)


class RegisteredHostMemory:
    """Host memory that exists already (a shared-memory region), page-locked where it lies and
    registered with CUDA (``cuMemHostRegister``), so async copies read it in place.

    ``PORTABLE``: the memory counts as pinned for every CUDA context, not only the one current
    when it was registered (it is the primary context here, but the flag makes that not
    matter). No ``DEVICEMAP``: the device never reads it through a mapping, only by copies.
    """

    def __init__(self, array: NDArray[np.uint8]) -> None:
        if array.ndim != 1 or not array.flags.c_contiguous:
            raise ValueError("only a 1-D contiguous array can be registered")
        drv = _driver()
        flags = int(drv.mem_host_register_flags.PORTABLE)
        # pycuda returns a new array over the same memory, whose .base is the registration.
        self._array: NDArray[np.uint8] | None = _call(
            "register_host_memory", drv.register_host_memory, array, flags
        )
        self.start = int(array.__array_interface__["data"][0])
        self.end = self.start + array.nbytes

    def holds(self, part: NDArray[Any]) -> bool:
        """Whether ``part`` (contiguous) lies wholly inside this registered memory."""
        if self._array is None or not part.flags.c_contiguous:
            return False
        address = int(part.__array_interface__["data"][0])
        return self.start <= address and address + part.nbytes <= self.end

    def view(self, address: int, nbytes: int) -> NDArray[np.uint8]:
        """The registered array's bytes [address, address + nbytes): a copy's source."""
        if self._array is None:
            raise CudaError("pycuda.driver.RegisteredHostMemory", "memory already unregistered")
        return self._array[address - self.start : address - self.start + nbytes]

    def unregister(self) -> None:
        """Unpin the memory (it stays mapped, as it was); idempotent."""
        if self._array is not None:
            array, self._array = self._array, None
            registration: Any = array.base
            _call("RegisteredHostMemory.unregister", registration.unregister)


def copy_to_device_async(
    dst: DeviceBuffer, src: NDArray[Any], stream: CudaStream, offset: int = 0
) -> None:
    """Queue a host-to-device copy of ``src`` (pinned or registered, contiguous) into ``dst``
    at byte ``offset``."""
    if offset < 0 or offset + src.nbytes > dst.nbytes:
        raise ValueError(
            f"copy of {src.nbytes} bytes at {offset} into a {dst.nbytes}-byte device buffer"
        )
    _call("memcpy_htod_async", _driver().memcpy_htod_async, dst.address + offset, src, stream.raw)


def copy_to_host_async(dst: NDArray[Any], src: DeviceBuffer, stream: CudaStream) -> None:
    """Queue a device-to-host copy filling ``dst`` (pinned, contiguous) from ``src``'s start."""
    if dst.nbytes > src.nbytes:
        raise ValueError(f"copy of {dst.nbytes} bytes out of a {src.nbytes}-byte device buffer")
    _call("memcpy_dtoh_async", _driver().memcpy_dtoh_async, dst, src.address, stream.raw)
