"""The hand-off of shared_inference.py in one process: two front-end proxies, one service.

Real Unix sockets and shared memory; a backend that can be held, so the queue's order is seen.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from framecast_server.backends.base import BackendInfo
from framecast_server.backends.null import NullBackend
from framecast_server.core.batcher import BatcherSettings, QueueFullError
from framecast_server.process.shared_inference import (
    InferenceProxy,
    InferenceService,
    create_link,
    unlink_link,
)
from numpy.typing import NDArray

SIZE = 8


class HeldBackend:
    """The null backend's answers; records each image's key; can be held before a batch."""

    def __init__(self) -> None:
        self._answers = NullBackend(max_batch=4, input_size=SIZE)
        self.keys: list[int] = []
        self.go = threading.Event()
        self.go.set()

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("held", "fp32", "cpu")

    @property
    def max_batch(self) -> int:
        return 4

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.go.wait(30)
        self.keys += [int(k) for k in images[:, 0, 0, 0]]
        return self._answers.infer(images)

    def close(self) -> None:
        self._answers.close()


def keyed(*keys: int) -> NDArray[np.uint8]:
    images = np.zeros((len(keys), SIZE, SIZE, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = keys
    return images


Host = tuple[InferenceService, HeldBackend, InferenceProxy, InferenceProxy]


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    settings = BatcherSettings(max_batch=4, max_queue=8, memory_budget_bytes=64 * SIZE * SIZE * 3)
    link = create_link(tmp_path, 2, settings.memory_budget_bytes, SIZE * SIZE * 3)
    backend = HeldBackend()
    service = InferenceService(link, backend, settings, input_size=SIZE)
    await service.start()
    front = [InferenceProxy(link, i, settings) for i in range(2)]
    for proxy in front:
        await proxy.start(timeout_s=30)
    backend.keys.clear()  # the warm-up batch
    try:
        yield service, backend, front[0], front[1]
    finally:
        backend.go.set()
        for proxy in front:
            await proxy.close()
        await service.close()
        unlink_link(link)


async def wait_queued(service: InferenceService, count: int) -> None:
    for _ in range(3000):
        if service.batcher.queued >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {count} queued")


async def test_each_front_end_gets_its_own_answers(host: Host) -> None:
    _, _, one, two = host
    first, second = await asyncio.gather(one.submit(keyed(3, 4)), two.submit(keyed(9)))
    assert [int(r.probabilities.argmax()) for r in first] == [3, 4]
    assert [int(r.probabilities.argmax()) for r in second] == [9]
    assert one.backend is not None
    assert one.backend.info.name == "held"


async def test_one_fair_order_over_both_front_ends(host: Host) -> None:
    service, backend, one, two = host
    backend.go.clear()
    blocker = one.submit_nowait(keyed(1, 1, 1, 1), caller="greedy")  # held in the backend
    await asyncio.sleep(0.2)
    greedy = [one.submit_nowait(keyed(10 + i), caller="greedy") for i in range(4)]
    await wait_queued(service, 4)
    polite = two.submit_nowait(keyed(99), caller="polite")
    await wait_queued(service, 5)
    backend.go.set()
    await asyncio.gather(blocker, polite, *greedy)
    # The polite caller of the other front end is not queued behind the greedy one's backlog.
    order = backend.keys[4:]
    assert order.index(99) <= 1, order


async def test_limits_are_the_hosts_and_refusal_is_immediate(host: Host) -> None:
    service, backend, one, two = host
    backend.go.clear()
    running = one.submit_nowait(keyed(1, 1, 1, 1), caller="a")
    await asyncio.sleep(0.2)
    queued = [one.submit_nowait(keyed(2, 2, 2, 2), caller=f"c{i}") for i in range(2)]
    await wait_queued(service, 8)  # max_queue 8 images
    with pytest.raises(QueueFullError, match="queue full"):
        two.submit_nowait(keyed(5), caller="late")  # the other front end sees the host's queue
    backend.go.set()
    await asyncio.gather(running, *queued)
    assert int((await two.submit(keyed(5)))[0].probabilities.argmax()) == 5


async def test_a_cancelled_request_is_withdrawn_and_its_room_freed(host: Host) -> None:
    service, backend, one, _ = host
    backend.go.clear()
    running = one.submit_nowait(keyed(1, 1, 1, 1))
    await asyncio.sleep(0.2)
    doomed = one.submit_nowait(keyed(77))
    await wait_queued(service, 1)
    doomed.cancel()
    for _ in range(3000):
        if service.batcher.queued == 0:
            break
        await asyncio.sleep(0.01)
    assert service.batcher.queued == 0
    backend.go.set()
    await running
    assert 77 not in backend.keys


async def test_the_model_statistics_are_the_hosts_whichever_front_end_is_asked(
    tmp_path: Path,
) -> None:
    settings = BatcherSettings(max_batch=4, max_queue=64, memory_budget_bytes=64 * SIZE * SIZE * 3)
    link = create_link(tmp_path, 2, settings.memory_budget_bytes, SIZE * SIZE * 3)
    backend = HeldBackend()
    service = InferenceService(link, backend, settings, input_size=SIZE)
    await service.start()
    front = [InferenceProxy(link, i, settings) for i in range(2)]
    try:
        for proxy in front:
            await proxy.start(timeout_s=30)
        calls = [front[i % 2].submit(keyed(i, i + 1), caller=f"c{i % 3}") for i in range(40)]
        answers = await asyncio.gather(*calls)
        for i, answer in enumerate(answers):
            assert [int(r.probabilities.argmax()) for r in answer] == [i, i + 1]
        for proxy in front:
            stats = proxy.model_stats
            assert stats.images_run == 80 + 1  # and the warm-up frame
            assert 1 <= stats.batches_run <= 41
            assert stats.compute_ns > 0
            assert stats.last_run_unix_ns > 0
        assert front[0].stats.images_run == 40  # its own answers
        assert service.batcher.queued == 0
        assert service.batcher.admitted_bytes == 0
    finally:
        for proxy in front:
            await proxy.close()
        await service.close()
        unlink_link(link)
