"""Small CUDA kernels (compiled with pycuda/nvcc on the GPU host) standing in for an engine.

``stats`` writes per-image statistics as "probabilities": out[i, j] is the sum of image i's bytes
at flat positions j, j + 1000, j + 2000, ... (at most 151 bytes, so fp32 holds it exactly and
``reference`` computes the same numbers with numpy). ``repeat`` redoes the work to lengthen the
kernel without changing its answer; ``zero`` is 0 at run time, which the compiler cannot know, so
the repeats are not optimized away. ``spin`` busy-waits a number of GPU clock cycles, ``poison``
writes through a null pointer (a sticky illegal-address error).
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import numpy as np
from numpy.typing import NDArray

IMAGE_BYTES = 224 * 224 * 3
CLASSES = 1000
THREADS = 256

SOURCE = r"""
__global__ void stats(const unsigned char* images, float* out, int n, int repeat, int zero)
{
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    int i = blockIdx.y;
    if (j >= 1000 || i >= n) return;
    const unsigned char* image = images + (size_t)i * 150528;
    float result = 0.0f;
    for (int r = 0; r < repeat; ++r) {
        float sum = 0.0f;
        for (int k = j; k < 150528; k += 1000) sum += image[k + zero * r];
        result = sum;
    }
    out[(size_t)i * 1000 + j] = result;
}

__global__ void spin(long long cycles)
{
    long long start = clock64();
    while (clock64() - start < cycles) { }
}

__global__ void poison(float* out)
{
    float* nowhere = (float*)0;
    nowhere[threadIdx.x] = out[0];
}
"""


def reference(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """What ``stats`` computes, with numpy."""
    flat = images.reshape(images.shape[0], -1).astype(np.float64)
    out = np.zeros((images.shape[0], CLASSES), np.float64)
    for j in range(CLASSES):
        out[:, j] = flat[:, j::CLASSES].sum(axis=1)
    return out.astype(np.float32)


class Kernels:
    """The compiled module, loaded into the context current on the calling thread."""

    def __init__(self) -> None:
        compiler: Any = importlib.import_module("pycuda.compiler")
        self._module = compiler.SourceModule(SOURCE)
        self.stats = self._module.get_function("stats")
        self.spin = self._module.get_function("spin")
        self.poison = self._module.get_function("poison")

    def launch_stats(self, stream: Any, images: int, out: int, n: int, *, repeat: int = 1) -> None:
        """Queue ``stats`` for ``n`` images on ``stream`` (a pycuda Stream)."""
        grid = ((CLASSES + THREADS - 1) // THREADS, n)
        self.stats(
            np.uintp(images),
            np.uintp(out),
            np.int32(n),
            np.int32(repeat),
            np.int32(0),
            block=(THREADS, 1, 1),
            grid=grid,
            stream=stream,
        )

    def launch_spin(self, stream: Any, milliseconds: float) -> None:
        """Queue a kernel that keeps the GPU busy for about ``milliseconds``."""
        drv: Any = importlib.import_module("pycuda.driver")
        khz = drv.Context.get_device().get_attribute(drv.device_attribute.CLOCK_RATE)
        self.spin(np.int64(int(milliseconds * khz)), block=(1, 1, 1), grid=(1, 1), stream=stream)


class KernelEngine:
    """``execute`` for the fake tensorrt's engines: runs ``stats`` (or ``poison``) for real.

    Streams are found by their raw handle (what execute_async_v3 gets) in ``streams``, which the
    suite fills, as the backend creates them, with weak references to its CudaStream objects (so
    that the streams still die with the backend's slots, while its context is current). The
    kernels are compiled on first use, on the backend's worker thread, where its CUDA context is
    current.
    """

    def __init__(self) -> None:
        self.streams: dict[int, Any] = {}
        self.poisoned = False
        self.repeat = 1
        self.spin_ms = 0.0  # a busy kernel before each batch, to make waiting observable
        self.bad_launch = False  # launch with an invalid block size (a non-sticky error)
        self._kernels: Kernels | None = None
        self._lock = threading.Lock()

    def __call__(self, stream_handle: int, n: int, images: int, out: int) -> bool:
        with self._lock:
            if self._kernels is None:
                self._kernels = Kernels()
        owner = self.streams[stream_handle]()
        if owner is None:
            raise LookupError(f"stream {stream_handle:#x} is gone")
        stream = owner.raw
        if self.spin_ms:
            self._kernels.launch_spin(stream, self.spin_ms)
        if self.bad_launch:
            self._kernels.stats(
                np.uintp(images),
                np.uintp(out),
                np.int32(n),
                np.int32(1),
                np.int32(0),
                block=(4096, 1, 1),
                grid=(1, n),
                stream=stream,
            )
        if self.poisoned:
            self._kernels.poison(np.uintp(out), block=(32, 1, 1), grid=(1, 1), stream=stream)
        else:
            self._kernels.launch_stats(stream, images, out, n, repeat=self.repeat)
        return True
