"""The shared inference process on (fake) TensorRT: the front ends' regions are registered with
CUDA, and a batch's host-to-device copies read the frames where the front end wrote them, with
no copy into the backend's pinned buffer first. Real Unix sockets and shared memory."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from framecast_server.backends.tensorrt import EngineSettings, cuda
from framecast_server.backends.tensorrt.backend import TensorRTBackend
from framecast_server.backends.tensorrt.errors import CudaError
from framecast_server.core.batcher import BatcherSettings
from framecast_server.process.shared_inference import (
    InferenceProxy,
    InferenceService,
    create_link,
    unlink_link,
)

from .trt_fakes import IMAGE_BYTES, FakeDriver, expected_class
from .trt_testing import make_images


def _plan(max_batch: int) -> bytes:
    return b"PLAN" + max_batch.to_bytes(4, "little")


async def test_batches_are_copied_to_the_device_from_the_registered_regions(
    tmp_path: Path, fake_trt: Any, fake_driver: FakeDriver
) -> None:
    settings = BatcherSettings(max_batch=8, max_queue=32, memory_budget_bytes=16 * IMAGE_BYTES)
    link = create_link(tmp_path, 2, settings.memory_budget_bytes, IMAGE_BYTES)
    backend = TensorRTBackend(_plan(8), EngineSettings(max_batch=8), device_name="Fake GPU 9000")
    service = InferenceService(link, backend, settings, input_size=224)
    proxies = [InferenceProxy(link, i, settings) for i in range(2)]
    try:
        await service.start()
        assert service.registered_regions == 2
        regions = list(fake_driver.registrations)
        assert len(regions) == 2
        # The warm-up batch (zeros made in the process, not in a region) was gathered into the
        # backend's own pinned buffer: that path still works beside the other.
        assert [s.kind for s in fake_driver.h2d_sources] == ["pagelocked"]
        for proxy in proxies:
            await proxy.start(timeout_s=30)
        fake_driver.h2d_sources.clear()
        one, two = make_images(3, seed=1), make_images(2, seed=2)
        first, second = await asyncio.gather(proxies[0].submit(one), proxies[1].submit(two))
        got = [int(r.probabilities.argmax()) for r in (*first, *second)]
        assert got == expected_class(np.concatenate([one, two])).tolist()
        sources = fake_driver.h2d_sources
        # Every frame reached the device from a registered region, none through a host copy.
        assert {s.kind for s in sources} == {"registered"}
        assert sum(s.nbytes for s in sources) == 5 * IMAGE_BYTES
        # Each copy read the region of the front end that sent the frames, at the units where
        # that front end wrote them (the service maps the regions at its own addresses).
        mine = {0: one.reshape(-1), 1: two.reshape(-1)}
        read: dict[int, bytes] = {0: b"", 1: b""}
        for source in sources:
            (index,) = [i for i, r in enumerate(regions) if r.start <= source.address < r.end]
            assert source.address + source.nbytes <= regions[index].end
            offset = source.address - regions[index].start
            assert offset % IMAGE_BYTES == 0
            read[index] += proxies[index]._frames[offset : offset + source.nbytes].tobytes()
        assert read == {i: frames.tobytes() for i, frames in mine.items()}
        # Three frames of one request, adjacent in the region: one copy for them.
        assert 3 * IMAGE_BYTES in {s.nbytes for s in sources}
    finally:
        for proxy in proxies:
            await proxy.close()
        await service.close()
        backend.close()
        unlink_link(link)
    assert fake_driver.registrations == []  # unregistered on close
    assert fake_driver.calls.count("RegisteredHostMemory.unregister") == 2


async def test_the_memory_trimmer_runs_in_the_inference_process(
    tmp_path: Path, fake_trt: Any, fake_driver: FakeDriver
) -> None:
    settings = BatcherSettings(max_batch=8, max_queue=32, memory_budget_bytes=16 * IMAGE_BYTES)
    link = create_link(tmp_path, 1, settings.memory_budget_bytes, IMAGE_BYTES)
    backend = TensorRTBackend(_plan(8), EngineSettings(max_batch=8), device_name="Fake GPU 9000")
    service = InferenceService(link, backend, settings, input_size=224)
    try:
        await service.start()
        task = service.trimmer._task
        assert task is not None
        assert not task.done()
    finally:
        await service.close()
        backend.close()
        unlink_link(link)
    assert service.trimmer._task is None


def test_a_copy_from_memory_neither_pinned_nor_registered_fails(
    fake_trt: Any, fake_driver: FakeDriver
) -> None:
    backend = TensorRTBackend(_plan(8), EngineSettings(max_batch=8), device_name="Fake GPU 9000")
    try:
        region = np.zeros(4 * IMAGE_BYTES, np.uint8)  # ordinary (pageable) host memory
        images = region[:IMAGE_BYTES].reshape(1, 224, 224, 3)
        backend.register_host_memory(region)
        assert backend.infer_parts([images]).shape == (1, 1000)
        assert fake_driver.h2d_sources[-1].kind == "registered"
        backend.unregister_host_memory(region)
        assert fake_driver.registrations == []
        # Unregistered, the same memory is gathered into the pinned buffer again.
        assert backend.infer_parts([images]).shape == (1, 1000)
        assert fake_driver.h2d_sources[-1].kind == "pagelocked"
        # The fake itself refuses an async copy from pageable memory, as a GPU would not
        # overlap it (a real driver stages it through a synchronous host copy).
        fake_driver.Device(0).retain_primary_context().push()
        try:
            stream = cuda.CudaStream()
            with pytest.raises(CudaError, match="not page-locked"):
                cuda.copy_to_device_async(cuda.DeviceBuffer(IMAGE_BYTES), images, stream)
        finally:
            fake_driver.Context.pop()
            fake_driver.primary_refs -= 1
    finally:
        backend.close()
