"""TensorRTBackend and the pycuda wrapper against fake tensorrt and pycuda.driver modules."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np
import pytest
from framecast_server.backends.base import (
    Backend,
    BackendBrokenError,
    BackendError,
    BreakableBackend,
)
from framecast_server.backends.tensorrt import EngineSettings, cuda
from framecast_server.backends.tensorrt.backend import (
    EngineDeserializeError,
    TensorRTBackend,
    check_engine_io,
    tensor_nbytes,
)
from framecast_server.backends.tensorrt.errors import (
    CudaError,
    EngineMismatchError,
    StickyCudaError,
)
from framecast_server.backends.tensorrt.trt_logging import process_logger

from .trt_fakes import (
    INPUT_SHAPE,
    NON_STICKY,
    STICKY,
    DeviceOp,
    FakeDriver,
    expected_class,
)
from .trt_testing import make_images


def test_buffer_sizes_for_max_batch() -> None:
    assert tensor_nbytes(INPUT_SHAPE, 1, 32) == 32 * 224 * 224 * 3 == 4_816_896
    assert tensor_nbytes([-1, 1000], 4, 32) == 128_000
    assert tensor_nbytes([-1, 1000], 4, 1) == 4000
    with pytest.raises(EngineMismatchError):
        tensor_nbytes([-1, -1, 1000], 4, 8)


def test_engine_io_check_sizes_buffers(fake_trt: Any) -> None:
    engine = fake_trt._Engine(64)
    layout = check_engine_io(engine, 32)
    assert (layout.input_bytes, layout.output_bytes) == (4_816_896, 128_000)


def test_engine_io_check_rejects_small_profile(fake_trt: Any) -> None:
    with pytest.raises(EngineMismatchError, match="max batch is 16"):
        check_engine_io(fake_trt._Engine(16), 32)


def test_engine_io_check_rejects_wrong_dtype(fake_trt: Any) -> None:
    engine = fake_trt._Engine(32)
    engine.io["probabilities"] = (fake_trt.TensorIOMode.OUTPUT, fake_trt.DataType.HALF, [-1, 1000])
    with pytest.raises(EngineMismatchError, match="HALF"):
        check_engine_io(engine, 32)


def _plan(max_batch: int) -> bytes:
    return b"PLAN" + max_batch.to_bytes(4, "little")


@pytest.fixture
def backend(fake_trt: Any, fake_driver: FakeDriver) -> Any:
    b = TensorRTBackend(_plan(8), EngineSettings(max_batch=8), device_name="Fake GPU 9000")
    yield b
    b.close()


def test_backend_satisfies_protocol_and_reports_info(backend: TensorRTBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.max_batch == 8
    assert (backend.info.name, backend.info.precision, backend.info.device) == (
        "tensorrt",
        "fp16",
        "Fake GPU 9000",
    )


def test_infer_returns_each_images_row(backend: TensorRTBackend) -> None:
    for n in (1, 5, 8):
        images = make_images(n, seed=n)
        probs = backend.infer(images)
        assert probs.dtype == np.float32
        assert probs.shape == (n, 1000)
        np.testing.assert_array_equal(probs.argmax(axis=1), expected_class(images))


def test_two_slots_with_two_contexts_are_used(
    backend: TensorRTBackend, fake_trt: Any, fake_driver: FakeDriver
) -> None:
    futures = [backend.submit(make_images(4, seed=s)) for s in range(6)]
    results = [f.result() for f in futures]
    for s, probs in enumerate(results):
        np.testing.assert_array_equal(probs.argmax(axis=1), expected_class(make_images(4, seed=s)))
    contexts = fake_trt.engine.contexts
    assert len(contexts) == 2
    # Each context got its own input buffer, sized for max_batch.
    assert contexts[0].addresses["images"] != contexts[1].addresses["images"]
    assert len(fake_driver.memory[contexts[0].addresses["images"]]) == 8 * 224 * 224 * 3
    assert all(c.shapes for c in contexts)


def test_infer_from_many_threads(backend: TensorRTBackend) -> None:
    def run(seed: int) -> bool:
        images = make_images(3, seed=100 + seed)
        return bool((backend.infer(images).argmax(axis=1) == expected_class(images)).all())

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(run, range(32)))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 224, 224, 3), np.uint8),
        np.zeros((9, 224, 224, 3), np.uint8),
        np.zeros((2, 224, 224, 4), np.uint8),
        np.zeros((2, 224, 224, 3), np.float32),
    ],
)
def test_bad_batches_are_rejected(backend: TensorRTBackend, bad: np.ndarray[Any, Any]) -> None:
    with pytest.raises(ValueError, match=r"images|batch"):
        backend.infer(cast(Any, bad))


def test_cuda_failure_names_the_call_and_backend_keeps_serving(
    backend: TensorRTBackend, fake_driver: FakeDriver
) -> None:
    fake_driver.fail_on["Stream.synchronize"] = NON_STICKY
    with pytest.raises(CudaError) as info:
        backend.infer(make_images(2))
    assert info.value.call == "pycuda.driver.Stream.synchronize"
    assert isinstance(info.value, BackendError)
    assert not isinstance(info.value, StickyCudaError)
    assert backend.broken is None
    fake_driver.fail_on.clear()
    images = make_images(2, seed=9)
    np.testing.assert_array_equal(backend.infer(images).argmax(axis=1), expected_class(images))


def test_close_frees_everything_and_rejects_new_work(
    fake_trt: Any, fake_driver: FakeDriver
) -> None:
    backend = TensorRTBackend(_plan(4), EngineSettings(max_batch=4), device_name="x")
    backend.infer(make_images(1))
    backend.close()
    backend.close()  # idempotent
    assert sorted(fake_driver.freed) == sorted(fake_driver.memory)  # every device buffer
    assert fake_driver.contexts_detached == 1
    assert fake_driver.calls[-2:] == ["Context.pop", "Context.detach"]
    with pytest.raises(BackendError, match="closed"):
        backend.infer(make_images(1))


def test_unloadable_plan_is_a_typed_error_and_cleans_up(
    fake_trt: Any, fake_driver: FakeDriver
) -> None:
    with pytest.raises(EngineDeserializeError) as info:
        TensorRTBackend(b"garbage", EngineSettings(), device_name="x")
    assert info.value.call == "Runtime.deserialize_cuda_engine"
    assert fake_driver.contexts_detached == 1
    assert not [t for t in threading.enumerate() if t.name == "tensorrt-worker"]


def test_plan_with_smaller_profile_than_settings_is_refused(
    fake_trt: Any, fake_driver: FakeDriver
) -> None:
    with pytest.raises(EngineMismatchError):
        TensorRTBackend(_plan(8), EngineSettings(max_batch=32), device_name="x")


@pytest.fixture
def context(fake_driver: FakeDriver) -> Iterator[cuda.CudaContext]:
    """A CUDA context current on this thread, as the backend's worker has."""
    ctx = cuda.CudaContext(0)
    yield ctx
    ctx.close()


def test_device_info_and_missing_device(fake_driver: FakeDriver) -> None:
    info = cuda.device_info(0)
    assert (info.name, info.compute_capability) == ("Fake GPU 9000", (8, 9))
    with pytest.raises(CudaError, match="device 3 requested, 1 present"):
        cuda.device_info(3)


def test_allocation_failure_names_mem_alloc(fake_driver: FakeDriver, context: Any) -> None:
    fake_driver.fail_on["mem_alloc"] = "cuMemAlloc failed: out of memory"
    with pytest.raises(CudaError) as info:
        cuda.DeviceBuffer(1024)
    assert info.value.call == "pycuda.driver.mem_alloc"
    assert "out of memory" in str(info.value)


def test_pinned_array_free_releases_host_allocation(fake_driver: FakeDriver, context: Any) -> None:
    pinned = cuda.PinnedArray((2, 3), np.float32)
    host = pinned.array.base
    pinned.free()
    pinned.free()
    assert host.freed  # type: ignore[union-attr]
    with pytest.raises(CudaError, match="already freed"):
        _ = pinned.array


def test_copies_refuse_to_overrun_device_buffers(fake_driver: FakeDriver, context: Any) -> None:
    stream = cuda.CudaStream()
    small = cuda.DeviceBuffer(8)
    with pytest.raises(ValueError, match="16 bytes"):
        cuda.copy_to_device_async(small, np.zeros(4, np.float32), stream)
    with pytest.raises(ValueError, match="16 bytes"):
        cuda.copy_to_host_async(np.zeros(4, np.float32), small, stream)


@pytest.mark.parametrize(
    ("message", "sticky"),
    [
        (STICKY, True),
        ("cuStreamSynchronize failed: unspecified launch failure", True),
        ("CUDA_ERROR_MISALIGNED_ADDRESS", True),
        ("cuStreamSynchronize failed: device-side assert triggered", True),
        (NON_STICKY, False),
        ("cuMemAlloc failed: out of memory", False),
    ],
)
def test_sticky_errors_are_told_apart(message: str, sticky: bool) -> None:
    assert cuda.is_sticky(message) is sticky


def test_context_blocks_instead_of_spinning_and_streams_do_not_block(
    backend: TensorRTBackend, fake_driver: FakeDriver
) -> None:
    # The worker runs on the device's primary context, set to block rather than spin.
    assert fake_driver.context_flags == []  # no context of its own (make_context)
    assert fake_driver.contexts == [fake_driver.primary]
    assert fake_driver.primary.flags == FakeDriver.ctx_flags.SCHED_BLOCKING_SYNC
    streams = list(fake_driver.streams.values())
    assert len(streams) == 2
    assert [s.flags for s in streams] == [cuda.STREAM_NON_BLOCKING] * 2 == [1, 1]


def test_each_slot_runs_on_its_own_stream(backend: TensorRTBackend, fake_trt: Any) -> None:
    for f in [backend.submit(make_images(2, seed=s)) for s in range(4)]:
        f.result()
    used = [set(c.streams) for c in fake_trt.engine.contexts]
    assert len(used) == 2
    assert all(len(u) == 1 for u in used)
    assert used[0] != used[1]


def test_the_process_logger_is_the_only_one_tensorrt_sees(
    backend: TensorRTBackend, fake_trt: Any
) -> None:
    assert [kind for kind, _ in fake_trt.created] == ["Runtime"]
    assert fake_trt.first_logger is process_logger()
    second = TensorRTBackend(_plan(8), EngineSettings(max_batch=8), device_name="x")
    second.close()
    assert fake_trt.ignored_loggers == []


def test_fake_refuses_shapes_outside_the_profile(fake_trt: Any) -> None:
    context = fake_trt._Engine(8).create_execution_context()
    assert context.set_input_shape("images", (8, 224, 224, 3))
    assert not context.set_input_shape("images", (9, 224, 224, 3))
    assert not context.set_input_shape("images", (0, 224, 224, 3))
    assert not context.set_input_shape("images", (2, 224, 224, 4))


def test_sticky_error_breaks_the_backend_for_good(
    backend: TensorRTBackend, fake_driver: FakeDriver
) -> None:
    told: list[str] = []
    backend.on_broken(told.append)
    assert isinstance(backend, BreakableBackend)
    np.testing.assert_array_equal(
        backend.infer(make_images(1)).argmax(axis=1), expected_class(make_images(1))
    )
    fake_driver.fail_on["Stream.synchronize"] = STICKY
    futures = []
    refused: list[BackendBrokenError] = []
    for seed in range(5):
        try:
            futures.append(backend.submit(make_images(2, seed=seed)))
        except BackendBrokenError as exc:  # refused at once once the worker has seen it
            refused.append(exc)
    assert all("illegal memory access" in str(exc) for exc in refused)
    assert futures  # the first batch was queued before anything broke
    for future in futures:
        with pytest.raises(BackendBrokenError, match="illegal memory access"):
            future.result(timeout=30)
    fake_driver.fail_on.clear()  # the GPU "recovers": the backend must not believe it
    with pytest.raises(BackendBrokenError, match="must be restarted"):
        backend.infer(make_images(1))
    assert backend.broken is not None
    assert told == [backend.broken]
    late: list[str] = []
    backend.on_broken(late.append)
    assert late == told


def _timeline_of(driver: FakeDriver, kind: str) -> list[DeviceOp]:
    return [op for op in driver.timeline if op.kind == kind]


def test_consecutive_batches_overlap_copies_and_compute_on_the_device_timeline(
    backend: TensorRTBackend, fake_driver: FakeDriver
) -> None:
    """TensorRTBackend itself, several batches: while one batch computes, the next one's input
    is copied in and the previous one's output copied out, so compute never waits for a copy.
    Read from the fake device's timeline (simulated ticks), not from wall time."""
    batches = [make_images(4, seed=20 + s) for s in range(6)]
    fake_driver.hold = threading.Event()  # all six are queued before the first copy returns
    futures = [backend.submit(images) for images in batches]
    fake_driver.hold.set()
    for images, future in zip(batches, futures, strict=True):
        np.testing.assert_array_equal(future.result().argmax(axis=1), expected_class(images))
    h2d, execute, d2h = (_timeline_of(fake_driver, k) for k in ("h2d", "execute", "d2h"))
    assert len(h2d) == len(execute) == len(d2h) == len(batches)
    assert [op.images for op in execute] == [4] * len(batches)
    # Each batch's ops run in order on its stream; consecutive batches alternate streams.
    for a, b, c in zip(h2d, execute, d2h, strict=True):
        assert a.stream == b.stream == c.stream
        assert a.end <= b.start
        assert b.end <= c.start
    assert all(x.stream != y.stream for x, y in itertools.pairwise(execute))
    for k in range(len(batches) - 1):
        assert h2d[k + 1].overlaps(execute[k]), f"batch {k + 1}'s copy-in waited for {k}"
        assert d2h[k].overlaps(execute[k + 1]), f"batch {k + 1}'s compute waited for {k}'s copy-out"
        # The compute engine goes straight from one batch to the next.
        assert execute[k + 1].start == execute[k].end, f"the GPU idled after batch {k}"


def test_one_caller_at_a_time_gets_no_overlap_on_the_timeline(
    backend: TensorRTBackend, fake_driver: FakeDriver
) -> None:
    """The timeline is not blind: batches that are never in flight together do not overlap."""
    for s in range(3):
        backend.infer(make_images(4, seed=s))
    h2d, execute = _timeline_of(fake_driver, "h2d"), _timeline_of(fake_driver, "execute")
    assert not any(h2d[k + 1].overlaps(execute[k]) for k in range(2))
    assert all(execute[k + 1].start > execute[k].end for k in range(2))


def test_parts_are_gathered_straight_into_the_pinned_input(
    backend: TensorRTBackend, fake_driver: FakeDriver
) -> None:
    """A batch given as parts (the batcher's requests) comes back row for row, in order,
    without the parts ever being joined into one array on the host."""
    parts = [make_images(n, seed=40 + n) for n in (1, 3, 2)]
    joined: list[object] = []
    original = np.concatenate

    def spy(*args: Any, **kwargs: Any) -> Any:
        joined.append(args)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(np, "concatenate", spy)
        probs = backend.infer_parts(parts)
    assert joined == []
    expected = [int(c) for part in parts for c in expected_class(part)]
    assert probs.shape == (6, 1000)
    assert probs.argmax(axis=1).tolist() == expected
    # The only host-to-device copy read the pinned buffer: the six images, once.
    (copy,) = _timeline_of(fake_driver, "h2d")
    assert copy.end - copy.start == pytest.approx(6.0)


@pytest.mark.parametrize(
    "parts",
    [
        [],
        [np.zeros((5, 224, 224, 3), np.uint8), np.zeros((4, 224, 224, 3), np.uint8)],
        [np.zeros((1, 224, 224, 3), np.uint8), np.zeros((1, 224, 224, 3), np.float32)],
    ],
)
def test_bad_parts_are_rejected(backend: TensorRTBackend, parts: list[Any]) -> None:
    with pytest.raises(ValueError, match=r"images|batch"):
        backend.infer_parts(parts)


class _NumpyWithoutConcatenate:
    """numpy, except that joining arrays fails the test (the batcher's view of numpy)."""

    def __getattr__(self, name: str) -> Any:
        if name == "concatenate":
            raise AssertionError("the batch was joined on the host before the pinned copy")
        return getattr(np, name)


async def test_the_batcher_gathers_requests_once_into_pinned_memory(
    fake_trt: Any, fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the batcher: several requests in one batch reach TensorRT's pinned input
    buffer with one copy each (no np.concatenate, then np.copyto), and come back in place."""
    from framecast_server.core.batcher import Batcher, BatcherSettings
    from framecast_server.core.batching import workers as batch_workers

    # The worker threads build each batch's input (core/batching/workers.py).
    monkeypatch.setattr(batch_workers, "np", _NumpyWithoutConcatenate())
    backend = TensorRTBackend(_plan(8), EngineSettings(max_batch=8), device_name="x")
    batcher = Batcher(backend, BatcherSettings(max_batch=8, max_delay_us=0, max_queue=64))
    await batcher.start()
    try:
        requests = [make_images(n, seed=60 + n) for n in (1, 3, 2, 2)]
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(r, caller=i) for i, r in enumerate(requests))), 30
        )
    finally:
        await asyncio.wait_for(batcher.close(), 30)
        backend.close()
    for images, items in zip(requests, results, strict=True):
        got = [int(item.probabilities.argmax()) for item in items]
        assert got == expected_class(images).tolist()
    assert max(item.batch_size for items in results for item in items) > 3  # joined requests
    executed = sum(op.images for op in fake_driver.timeline if op.kind == "execute")
    assert executed == 8
