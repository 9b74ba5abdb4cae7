"""The TensorRT backend's CUDA half on a real GPU: pycuda context, streams, pinned and device
buffers, async copies and synchronization, with a small kernel standing in for the engine.

Marked ``cuda``; skips with the reason where there is no GPU, pycuda or nvcc. TensorRT is not
needed (the ``gpu`` suite covers it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framecast_server.backends.tensorrt import EngineSettings, cuda
from framecast_server.backends.tensorrt.backend import TensorRTBackend
from numpy.typing import NDArray

from .kernels import IMAGE_BYTES, Kernels, reference

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("cuda_ready")]

MAX_BATCH = 16
HERE = Path(__file__).resolve().parent


def images(n: int, seed: int) -> NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


@pytest.fixture
def backend(kernel_trt: Any) -> Iterator[TensorRTBackend]:
    """The real TensorRTBackend (real pycuda) whose engine is the stats kernel."""
    b = TensorRTBackend(
        b"PLAN" + MAX_BATCH.to_bytes(4, "little"),
        EngineSettings(max_batch=MAX_BATCH),
        device_name=cuda.device_info(0).name,
    )
    yield b
    b.close()


@pytest.fixture
def context(cuda_ready: None) -> Iterator[cuda.CudaContext]:
    """A blocking-sync CUDA context current on this thread."""
    ctx = cuda.CudaContext(0)
    yield ctx
    ctx.close()


def test_buffers_are_pinned_and_sized_for_max_batch(backend: TensorRTBackend) -> None:
    slots = backend._slots
    assert len(slots) == 2
    for slot in slots:
        assert slot.dev_in.nbytes == MAX_BATCH * IMAGE_BYTES
        assert slot.dev_out.nbytes == MAX_BATCH * 1000 * 4
        assert slot.host_in.array.shape == (MAX_BATCH, 224, 224, 3)
        assert slot.host_out.array.shape == (MAX_BATCH, 1000)
    assert slots[0].dev_in.address != slots[1].dev_in.address
    assert slots[0].host_in.array.ctypes.data != slots[1].host_in.array.ctypes.data


def test_results_equal_numpy_for_each_batch_size(backend: TensorRTBackend) -> None:
    for n in (1, 7, MAX_BATCH):
        batch = images(n, seed=n)
        np.testing.assert_array_equal(backend.infer(batch), reference(batch))


def test_batches_in_flight_on_both_slots_equal_sequential_results(
    backend: TensorRTBackend, kernel_trt: Any
) -> None:
    batches = [images(n, seed) for seed, n in enumerate([16, 3, 16, 1, 9, 16, 5, 16, 2, 16])]
    sequential = [backend.infer(b) for b in batches]
    futures = [backend.submit(b) for b in batches]  # all queued at once: both slots busy
    pipelined = [f.result(timeout=60) for f in futures]
    for batch, one, other in zip(batches, sequential, pipelined, strict=True):
        np.testing.assert_array_equal(other, one)
        np.testing.assert_array_equal(other, reference(batch))
    used = [set(c.streams) for c in kernel_trt.engine.contexts]
    assert len(used) == 2
    assert all(len(u) == 1 for u in used)
    assert used[0] != used[1]


def test_waiting_for_a_batch_sleeps_instead_of_spinning(
    backend: TensorRTBackend, kernel_trt: Any, record_property: Any
) -> None:
    kernel_trt.kernel_engine.spin_ms = 400.0
    batch = images(2, seed=1)
    backend.infer(batch)  # compile and warm up
    cpu, wall = time.process_time(), time.perf_counter()
    result = backend.infer(batch)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    record_property("wait_wall_s", round(wall, 3))
    record_property("wait_cpu_s", round(cpu, 3))
    np.testing.assert_array_equal(result, reference(batch))
    assert wall >= 0.35
    # A spinning wait burns a core for the whole kernel; a blocking one sleeps on an interrupt.
    assert cpu < 0.25 * wall, f"{cpu:.3f} s CPU while waiting {wall:.3f} s"


def _events(n: int) -> list[Any]:
    import pycuda.driver as drv  # type: ignore[import-not-found, unused-ignore]

    return [drv.Event() for _ in range(n)]


@pytest.mark.parametrize(("flags", "overtakes"), [(cuda.STREAM_NON_BLOCKING, True), (0, False)])
def test_non_blocking_streams_do_not_wait_for_the_legacy_default_stream(
    context: cuda.CudaContext, flags: int, overtakes: bool
) -> None:
    import pycuda.driver as drv  # type: ignore[import-not-found, unused-ignore]

    kernels = Kernels()
    dev_in, dev_out = cuda.DeviceBuffer(IMAGE_BYTES), cuda.DeviceBuffer(4000)
    stream = drv.Stream(flags)
    busy_done, ours = _events(2)
    kernels.launch_spin(None, 1000.0)  # None: the legacy default stream
    busy_done.record()
    kernels.launch_stats(stream, dev_in.address, dev_out.address, 1)
    ours.record(stream)
    ours.synchronize()
    # With flag 1 our work ran while the default stream was still busy; with 0 (the control,
    # which shows the check can fail) it had to wait for it.
    assert (not busy_done.query()) is overtakes
    busy_done.synchronize()
    dev_in.free()
    dev_out.free()


def test_copies_overlap_compute_on_two_streams(
    context: cuda.CudaContext, record_property: Any
) -> None:
    """Two streams (as the two slots) against one, measured with CUDA events."""
    kernels = Kernels()
    n, rounds = 64, 24
    streams = [cuda.CudaStream() for _ in range(2)]
    host_in = [cuda.PinnedArray((n, 224, 224, 3), np.uint8) for _ in range(2)]
    host_out = [cuda.PinnedArray((n, 1000), np.float32) for _ in range(2)]
    dev_in = [cuda.DeviceBuffer(n * IMAGE_BYTES) for _ in range(2)]
    dev_out = [cuda.DeviceBuffer(n * 4000) for _ in range(2)]
    for i in range(2):
        host_in[i].array[...] = images(n, seed=i)

    def timed(enqueue: Callable[[cuda.CudaStream], None]) -> float:
        start, end = _events(2)
        start.record(streams[0].raw)
        enqueue(streams[0])
        end.record(streams[0].raw)
        end.synchronize()
        return float(start.time_till(end))

    copy_ms = timed(lambda s: cuda.copy_to_device_async(dev_in[0], host_in[0].array, s))
    one_ms = timed(lambda s: kernels.launch_stats(s.raw, dev_in[0].address, dev_out[0].address, n))
    # Make compute about as long as the copies, where overlap matters most.
    repeat = max(1, round(copy_ms / max(one_ms, 1e-3)))

    def run(slots: int) -> float:
        starts, ends = _events(2), _events(2)
        for i in range(2):
            starts[i].record(streams[i].raw)
        for b in range(rounds):
            i = b % slots
            s = streams[i]
            cuda.copy_to_device_async(dev_in[i], host_in[i].array, s)
            kernels.launch_stats(s.raw, dev_in[i].address, dev_out[i].address, n, repeat=repeat)
            cuda.copy_to_host_async(host_out[i].array, dev_out[i], s)
        for i in range(2):
            ends[i].record(streams[i].raw)
        for e in ends:
            e.synchronize()
        first = starts[0] if starts[0].time_till(starts[1]) >= 0 else starts[1]
        return max(float(first.time_till(e)) for e in ends)

    run(2)  # warm up
    serial_ms, overlapped_ms = run(1), run(2)
    for i in range(2):
        np.testing.assert_array_equal(host_out[i].array, reference(host_in[i].array))
    record_property("copy_ms_per_batch", round(copy_ms, 3))
    record_property("kernel_repeat", repeat)
    record_property("one_stream_ms", round(serial_ms, 2))
    record_property("two_streams_ms", round(overlapped_ms, 2))
    print(
        f"copy {copy_ms:.3f} ms/batch; {rounds} batches: one stream {serial_ms:.1f} ms, "
        f"two streams {overlapped_ms:.1f} ms ({overlapped_ms / serial_ms:.2f}x)"
    )
    assert overlapped_ms < 0.8 * serial_ms
    for group in (dev_in, dev_out, host_in, host_out):
        for item in group:
            item.free()


def test_sticky_error_breaks_the_backend(cuda_ready: None) -> None:
    # In a child process: after an illegal address the whole process's CUDA state is lost.
    tests_dir = HERE.parent
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tests_dir), os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(
        [sys.executable, str(HERE / "sticky_child.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(result.stdout, result.stderr[-2000:])
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert "OK broken:" in result.stdout
    assert "illegal" in result.stdout.lower()


def test_a_non_sticky_error_fails_only_its_batch(backend: TensorRTBackend, kernel_trt: Any) -> None:
    from framecast_server.backends.base import BackendBrokenError, BackendError

    engine = kernel_trt.kernel_engine
    good = images(3, seed=5)
    backend.infer(good)
    engine.bad_launch = True  # cuLaunchKernel: invalid argument (the context survives)
    with pytest.raises(BackendError) as info:
        backend.infer(good)
    assert not isinstance(info.value, BackendBrokenError)
    engine.bad_launch = False
    np.testing.assert_array_equal(backend.infer(good), reference(good))
    assert backend.broken is None
