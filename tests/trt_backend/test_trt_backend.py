"""TensorRTBackend and the pycuda wrapper against fake tensorrt and pycuda.driver modules."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import numpy as np
import pytest
from framecast_server.backends.base import Backend, BackendError
from framecast_server.backends.tensorrt import EngineSettings, cuda
from framecast_server.backends.tensorrt.backend import (
    EngineDeserializeError,
    TensorRTBackend,
    check_engine_io,
    tensor_nbytes,
)
from framecast_server.backends.tensorrt.errors import CudaError, EngineMismatchError

from .trt_fakes import INPUT_SHAPE, FakeDriver, expected_class
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
    fake_trt.driver_memory = fake_driver.memory
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
    fake_driver.fail_on.add("Stream.synchronize")
    with pytest.raises(CudaError) as info:
        backend.infer(make_images(2))
    assert info.value.call == "pycuda.driver.Stream.synchronize"
    assert isinstance(info.value, BackendError)
    fake_driver.fail_on.clear()
    images = make_images(2, seed=9)
    np.testing.assert_array_equal(backend.infer(images).argmax(axis=1), expected_class(images))


def test_close_frees_everything_and_rejects_new_work(
    fake_trt: Any, fake_driver: FakeDriver
) -> None:
    fake_trt.driver_memory = fake_driver.memory
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


def test_device_info_and_missing_device(fake_driver: FakeDriver) -> None:
    info = cuda.device_info(0)
    assert (info.name, info.compute_capability) == ("Fake GPU 9000", (8, 9))
    with pytest.raises(CudaError, match="device 3 requested, 1 present"):
        cuda.device_info(3)


def test_allocation_failure_names_mem_alloc(fake_driver: FakeDriver) -> None:
    fake_driver.fail_on.add("mem_alloc")
    with pytest.raises(CudaError) as info:
        cuda.DeviceBuffer(1024)
    assert info.value.call == "pycuda.driver.mem_alloc"
    assert "CUDA_ERROR_ILLEGAL_ADDRESS" in str(info.value)


def test_pinned_array_free_releases_host_allocation(fake_driver: FakeDriver) -> None:
    pinned = cuda.PinnedArray((2, 3), np.float32)
    host = pinned.array.base
    pinned.free()
    pinned.free()
    assert host.freed  # type: ignore[union-attr]
    with pytest.raises(CudaError, match="already freed"):
        _ = pinned.array


def test_copies_refuse_to_overrun_device_buffers(fake_driver: FakeDriver) -> None:
    stream = cuda.CudaStream()
    small = cuda.DeviceBuffer(8)
    with pytest.raises(ValueError, match="16 bytes"):
        cuda.copy_to_device_async(small, np.zeros(4, np.float32), stream)
    with pytest.raises(ValueError, match="16 bytes"):
        cuda.copy_to_host_async(np.zeros(4, np.float32), small, stream)
