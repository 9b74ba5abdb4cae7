"""The dynamic batcher against a fake backend that identifies every image it sees.

Each test image carries an id in its first pixel (red + 256 * green), and the fake backend
returns that id in column 0 of the image's output row, so a result proves which image it belongs
to. The fake can be held inside ``infer`` on a gate (a threading.Event) so that tests arrange the
queue deterministically while the "backend" is busy, instead of relying on timing.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import pytest
from framecast_server.backends.base import Backend, BackendError, BackendInfo
from framecast_server.core.batcher import (
    Batcher,
    BatcherClosedError,
    BatcherSettings,
    DeadlineExpiredError,
    ItemResult,
    QueueFullError,
)
from numpy.typing import NDArray

SIZE = 4  # image height and width; the batcher does not care, small keeps the tests cheap
TIMEOUT = 30.0  # generous bound for anything that should finish; only trips on a hang


def frames(*ids: int, size: int = SIZE) -> NDArray[np.uint8]:
    """Images whose first pixel encodes ``ids`` (0 <= id < 65536)."""
    images = np.zeros((len(ids), size, size, 3), dtype=np.uint8)
    for i, ident in enumerate(ids):
        images[i, 0, 0, 0] = ident % 256
        images[i, 0, 0, 1] = ident // 256
    return images


def ids_of(images: NDArray[np.uint8]) -> list[int]:
    """The ids ``frames`` put in ``images``."""
    return [int(r) + 256 * int(g) for r, g in images[:, 0, 0, :2]]


def result_ids(results: Sequence[ItemResult]) -> list[int]:
    """The ids the fake backend wrote into ``results``."""
    return [int(result.probabilities[0]) for result in results]


class FakeBackend:
    """Records every batch and the thread it ran on; can be held, slowed or made to fail."""

    def __init__(self, max_batch: int = 64, *, delay: float = 0.0, concurrency: int = 1) -> None:
        self._loop = asyncio.get_running_loop()
        self._max_batch = max_batch
        self._concurrency = concurrency
        self._lock = threading.Lock()
        self.delay = delay  # simulated compute time in infer (not used to synchronize)
        self.gate = threading.Event()
        self.gate.set()
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.entered: asyncio.Queue[list[int]] = asyncio.Queue()
        self.fail_on: set[int] = set()  # ids that make the whole batch raise
        self.error: Callable[[str], Exception] = RuntimeError
        self.wrong_rows = False
        self.reuse_output = False
        self._shared_output = np.zeros((max_batch, 2), dtype=np.float32)
        self._active = 0
        self.max_active = 0
        self.closed = False

    @property
    def info(self) -> BackendInfo:
        return BackendInfo("fake", "fp32", "cpu")

    @property
    def max_batch(self) -> int:
        return self._max_batch

    @property
    def max_concurrent_batches(self) -> int:
        return self._concurrency

    def hold(self) -> None:
        """Make the next infer calls block until ``release``."""
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def infer(self, images: NDArray[np.uint8]) -> NDArray[np.float32]:
        with self._lock:
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        try:
            assert 1 <= len(images) <= self._max_batch
            ids = ids_of(images)
            self.threads.add(threading.get_ident())
            self.batches.append(ids)
            self._loop.call_soon_threadsafe(self.entered.put_nowait, ids)
            if not self.gate.wait(timeout=TIMEOUT):
                raise RuntimeError("the test never released the gate")
            if self.delay:
                time.sleep(self.delay)
            if self.fail_on.intersection(ids):
                raise self.error(f"poisoned batch {ids}")
            if self.reuse_output:
                output = self._shared_output[: len(ids)]
            else:
                output = np.zeros((len(ids), 2), dtype=np.float32)
            output[:, 0] = ids
            output[:, 1] = len(ids)
            return output[:-1] if self.wrong_rows else output
        finally:
            with self._lock:
                self._active -= 1

    def close(self) -> None:
        self.closed = True


class Harness:
    """Builds started batchers on fake backends and tears them down whatever the test did."""

    def __init__(self) -> None:
        self.fakes: list[FakeBackend] = []
        self.batchers: list[Batcher] = []

    async def make(
        self,
        *,
        max_batch: int = 8,
        max_delay_us: int = 0,
        max_queue: int = 256,
        memory_budget_bytes: int = 1 << 30,
        delay: float = 0.0,
        concurrency: int = 1,
    ) -> tuple[Batcher, FakeBackend]:
        fake = FakeBackend(max_batch=max_batch, delay=delay, concurrency=concurrency)
        batcher = Batcher(
            fake,
            BatcherSettings(
                max_batch=max_batch,
                max_delay_us=max_delay_us,
                max_queue=max_queue,
                memory_budget_bytes=memory_budget_bytes,
            ),
        )
        self.fakes.append(fake)
        self.batchers.append(batcher)
        await batcher.start()
        return batcher, fake


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    for fake in h.fakes:
        fake.release()
    for batcher in h.batchers:
        await asyncio.wait_for(batcher.close(), TIMEOUT)


async def settle() -> None:
    """Let every task spawned so far run up to its first suspension.

    asyncio runs ready callbacks first in, first out, and a new task's first step is scheduled
    when it is created, so one yield lets them all run; ``submit`` admits a request before it
    first suspends, so afterwards the batcher's queue reflects every spawned submit.
    """
    await asyncio.sleep(0)


def spawn(
    batcher: Batcher, *ids: int, deadline: float | None = None, caller: object = None
) -> asyncio.Task[list[int]]:
    """Submit ``frames(*ids)`` in a task that returns the ids found in the results.

    Each spawned request is its own caller unless told (callers with one request each are
    served in arrival order, and none of them is over its fair share).
    """
    key = object() if caller is None else caller

    async def run() -> list[int]:
        return result_ids(await batcher.submit(frames(*ids), deadline=deadline, caller=key))

    return asyncio.ensure_future(run())


async def busy(batcher: Batcher, fake: FakeBackend, *ids: int) -> asyncio.Task[list[int]]:
    """Hold the backend inside infer on a batch of ``ids``; returns that request's task."""
    fake.hold()
    task = spawn(batcher, *ids)
    assert await asyncio.wait_for(fake.entered.get(), TIMEOUT) == list(ids)
    return task


# --- batch formation -------------------------------------------------------------------------


async def test_queued_work_forms_full_batches_in_order(harness: Harness) -> None:
    # A long delay: only a full batch may trigger dispatch here.
    batcher, fake = await harness.make(max_batch=8, max_delay_us=30_000_000)
    first = await busy(batcher, fake, *range(1, 9))
    singles = [spawn(batcher, 100 + i) for i in range(40)]
    await settle()
    assert batcher.queued == 40
    fake.release()
    assert await asyncio.wait_for(first, TIMEOUT) == list(range(1, 9))
    results = await asyncio.wait_for(asyncio.gather(*singles), TIMEOUT)
    assert results == [[100 + i] for i in range(40)]
    assert fake.batches == [list(range(1, 9))] + [
        list(range(100 + k, 108 + k)) for k in range(0, 40, 8)
    ]
    stats = batcher.stats
    assert (stats.batches_run, stats.images_run, stats.queued) == (6, 48, 0)


async def test_concurrent_callers_get_their_own_results(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=8, max_delay_us=2000, delay=0.002)
    rng = random.Random(7)
    requests: list[list[list[int]]] = []  # per caller, per round, the ids it sends
    next_id = 1
    for _ in range(60):
        rounds = []
        for _ in range(3):
            n = rng.randint(1, 4)
            rounds.append(list(range(next_id, next_id + n)))
            next_id += n
        requests.append(rounds)

    async def caller(rounds: list[list[int]]) -> list[list[ItemResult]]:
        return [await batcher.submit(frames(*ids)) for ids in rounds]

    outcomes = await asyncio.wait_for(
        asyncio.gather(*(caller(rounds) for rounds in requests)), TIMEOUT
    )
    batch_of = {ident: batch for batch in fake.batches for ident in batch}
    for rounds, results in zip(requests, outcomes, strict=True):
        for ids, items in zip(rounds, results, strict=True):
            assert result_ids(items) == ids
            # The request rode in one batch, contiguously, and the reported size is that batch's.
            batch = batch_of[ids[0]]
            start = batch.index(ids[0])
            assert batch[start : start + len(ids)] == ids
            assert all(item.batch_size == len(batch) for item in items)
            assert all(item.probabilities.shape == (2,) for item in items)

    sizes = [len(batch) for batch in fake.batches]
    total = sum(len(ids) for rounds in requests for ids in rounds)
    assert max(sizes) > 1
    assert max(sizes) <= 8
    assert sum(sizes) == total
    assert sorted(i for batch in fake.batches for i in batch) == list(range(1, total + 1))
    # One infer call per batch, never two at once, always on the same non-loop thread.
    assert batcher.stats.batches_run == len(fake.batches)
    assert batcher.stats.images_run == total
    assert fake.max_active == 1
    assert len(fake.threads) == 1
    assert threading.get_ident() not in fake.threads


async def test_a_backend_that_overlaps_batches_gets_that_many_in_flight(
    harness: Harness,
) -> None:
    batcher, fake = await harness.make(max_batch=2, concurrency=2)
    fake.hold()
    tasks = [spawn(batcher, i) for i in range(1, 7)]
    await settle()
    entered = [await asyncio.wait_for(fake.entered.get(), TIMEOUT) for _ in range(2)]
    # Both workers are inside infer at once (requests admitted in one event-loop iteration
    # share a batch); the rest waits for a free worker.
    assert sorted(entered) == [[1, 2], [3, 4]]
    assert fake.max_active == 2
    assert len(fake.threads) == 2
    assert batcher.queued == 2
    fake.release()
    results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert results == [[i] for i in range(1, 7)]
    assert fake.batches[2:] == [[5, 6]]
    assert fake.max_active <= 2


async def test_requests_admitted_in_one_loop_iteration_share_a_batch(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=8, max_delay_us=0)
    results = await asyncio.wait_for(
        asyncio.gather(*(spawn(batcher, i) for i in range(1, 4))), TIMEOUT
    )
    assert results == [[1], [2], [3]]
    assert fake.batches == [[1, 2, 3]]


async def test_one_batch_at_a_time_for_other_backends(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=2, delay=0.01)
    results = await asyncio.wait_for(
        asyncio.gather(*(spawn(batcher, i) for i in range(1, 21))), TIMEOUT
    )
    assert results == [[i] for i in range(1, 21)]
    assert fake.max_active == 1
    assert len(fake.threads) == 1


async def test_requests_are_not_split_and_stay_first_in_first_out(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=8, max_delay_us=0)
    first = await busy(batcher, fake, 1)
    b = spawn(batcher, 10, 11, 12, 13, 14)
    c = spawn(batcher, 20, 21, 22, 23, 24)
    d = spawn(batcher, 30, 31, 32)
    await settle()
    assert batcher.queued == 13
    fake.release()
    await asyncio.wait_for(asyncio.gather(first, b, c, d), TIMEOUT)
    # c does not fit after b, so it opens the next batch; d, which would fit after b, does not
    # overtake c.
    assert fake.batches == [[1], [10, 11, 12, 13, 14], [20, 21, 22, 23, 24, 30, 31, 32]]


async def test_images_of_different_sizes_go_in_different_batches(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=8, max_delay_us=0)
    first = await busy(batcher, fake, 1)
    tasks = [
        asyncio.ensure_future(batcher.submit(frames(ident, size=size)))
        for ident, size in ((2, 4), (3, 6), (4, 6), (5, 4))
    ]
    await settle()
    assert batcher.queued == 4
    fake.release()
    await asyncio.wait_for(first, TIMEOUT)
    results = await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    assert [result_ids(r) for r in results] == [[2], [3], [4], [5]]
    assert fake.batches == [[1], [2], [3, 4], [5]]


async def test_lone_item_waits_max_delay_not_for_a_full_batch(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=32, max_delay_us=50_000)
    started = time.monotonic()
    (item,) = await asyncio.wait_for(batcher.submit(frames(1)), TIMEOUT)
    elapsed = time.monotonic() - started
    assert result_ids([item]) == [1]
    assert item.batch_size == 1
    # It waited out the window for company (measured on the same monotonic clock)...
    assert item.queue_us >= 50_000
    # ...and then went alone; the bound is loose for a loaded machine, but far below a wrong unit
    # (50 s) or waiting for 31 more images that never come.
    assert elapsed < 0.05 + 5.0
    assert fake.batches == [[1]]


async def test_full_batch_goes_without_waiting_for_the_delay(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=8, max_delay_us=60_000_000)
    # Two callers together fill the batch: it must go at once, not after the 60 s delay.
    a = spawn(batcher, 1, 2, 3, 4)
    b = spawn(batcher, 5, 6, 7, 8)
    assert list(await asyncio.wait_for(asyncio.gather(a, b), TIMEOUT)) == [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
    ]
    assert fake.batches == [[1, 2, 3, 4, 5, 6, 7, 8]]


async def test_queue_time_and_compute_time_are_reported(harness: Harness) -> None:
    batcher, _ = await harness.make(max_batch=4, max_delay_us=0, delay=0.02)
    (item,) = await asyncio.wait_for(batcher.submit(frames(1)), TIMEOUT)
    assert item.compute_us >= 19_000  # the fake slept 20 ms inside infer
    assert item.queue_us >= 0


# --- cancellation and deadlines ----------------------------------------------------------------


async def test_cancelled_caller_is_dropped_before_compute(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4, max_delay_us=0)
    first = await busy(batcher, fake, 1)
    doomed = spawn(batcher, 2, 3)
    kept = spawn(batcher, 4)
    await settle()
    assert batcher.queued == 3
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert batcher.queued == 1
    assert batcher.stats.dropped_cancelled == 2
    fake.release()
    assert await asyncio.wait_for(first, TIMEOUT) == [1]
    assert await asyncio.wait_for(kept, TIMEOUT) == [4]
    assert fake.batches == [[1], [4]]


async def test_cancelling_a_nowait_future_withdraws_it_at_once(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4, max_delay_us=0)
    first = await busy(batcher, fake, 1)
    doomed = batcher.submit_nowait(frames(2, 3))
    kept = batcher.submit_nowait(frames(4))
    assert batcher.queued == 3
    assert doomed.cancel()
    # No event-loop turn needed: the queue and the counters change in cancel() itself.
    assert batcher.queued == 1
    assert batcher.stats.dropped_cancelled == 2
    assert not doomed.cancel()  # a second cancel changes nothing
    assert batcher.stats.dropped_cancelled == 2
    fake.release()
    assert await asyncio.wait_for(first, TIMEOUT) == [1]
    assert result_ids(await asyncio.wait_for(kept, TIMEOUT)) == [4]
    assert fake.batches == [[1], [4]]


async def test_caller_cancelled_mid_compute_does_not_break_the_batcher(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4, max_delay_us=0)
    first = await busy(batcher, fake, 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    fake.release()
    assert result_ids(await asyncio.wait_for(batcher.submit(frames(2)), TIMEOUT)) == [2]
    # The running batch was computed (it cannot be recalled), its result simply discarded.
    assert fake.batches == [[1], [2]]
    assert batcher.stats.batches_run == 2
    assert batcher.stats.dropped_cancelled == 0


async def test_deadline_expiring_in_the_queue_drops_the_request(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4, max_delay_us=0)
    first = await busy(batcher, fake, 1)
    late = spawn(batcher, 2, 3, deadline=time.monotonic() + 0.05)
    # The backend is still held: the caller hears of the expiry without waiting for it.
    with pytest.raises(DeadlineExpiredError):
        await asyncio.wait_for(late, TIMEOUT)
    assert batcher.queued == 0
    assert batcher.stats.dropped_expired == 2
    fake.release()
    assert await asyncio.wait_for(first, TIMEOUT) == [1]
    assert result_ids(await asyncio.wait_for(batcher.submit(frames(4)), TIMEOUT)) == [4]
    assert fake.batches == [[1], [4]]


async def test_deadline_already_passed_is_refused_on_arrival(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4)
    with pytest.raises(DeadlineExpiredError):
        await batcher.submit(frames(1), deadline=time.monotonic() - 0.001)
    assert batcher.stats.dropped_expired == 1
    assert batcher.queued == 0
    assert fake.batches == []


async def test_deadline_in_time_is_served(harness: Harness) -> None:
    batcher, _ = await harness.make(max_batch=4)
    results = await asyncio.wait_for(
        batcher.submit(frames(1, 2), deadline=time.monotonic() + 60), TIMEOUT
    )
    assert result_ids(results) == [1, 2]
    assert batcher.stats.dropped_expired == 0


# --- admission -------------------------------------------------------------------------------


async def test_queue_full_is_refused_at_once_and_recovers(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4, max_delay_us=0, max_queue=8)
    first = await busy(batcher, fake, 1)  # computing: not counted as queued
    b = spawn(batcher, 10, 11, 12, 13)
    c = spawn(batcher, 20, 21, 22)
    await settle()
    assert batcher.queued == 7
    # All or nothing: 2 images do not fit in the 1 free slot, so neither is admitted. The
    # refusal must not wait for the (held) backend: wait_for would raise TimeoutError instead.
    with pytest.raises(QueueFullError):
        await asyncio.wait_for(batcher.submit(frames(30, 31)), 1.0)
    assert batcher.queued == 7
    e = spawn(batcher, 40)
    await settle()
    assert batcher.queued == 8
    with pytest.raises(QueueFullError):
        await asyncio.wait_for(batcher.submit(frames(50)), 1.0)
    assert batcher.stats.rejected_full == 3
    fake.release()
    assert list(await asyncio.wait_for(asyncio.gather(first, b, c, e), TIMEOUT)) == [
        [1],
        [10, 11, 12, 13],
        [20, 21, 22],
        [40],
    ]
    # Room again once the queue drains.
    assert batcher.queued == 0
    again = await asyncio.wait_for(batcher.submit(frames(60, 61, 62, 63)), TIMEOUT)
    assert result_ids(again) == [60, 61, 62, 63]
    seen = {i for batch in fake.batches for i in batch}
    assert seen.isdisjoint({30, 31, 50})


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((1, SIZE, SIZE, 3), dtype=np.float32), "uint8"),
        (np.zeros((SIZE, SIZE, 3), dtype=np.uint8), r"\[n, H, W, 3\]"),
        (np.zeros((1, SIZE, SIZE, 4), dtype=np.uint8), r"\[n, H, W, 3\]"),
        (np.zeros((0, SIZE, SIZE, 3), dtype=np.uint8), "1 to 4 images"),
        (np.zeros((5, SIZE, SIZE, 3), dtype=np.uint8), "1 to 4 images"),
        (np.zeros((1, 0, SIZE, 3), dtype=np.uint8), "empty"),
    ],
)
async def test_bad_input_is_refused(
    harness: Harness, images: NDArray[np.uint8], message: str
) -> None:
    batcher, fake = await harness.make(max_batch=4)
    with pytest.raises(ValueError, match=message):
        await batcher.submit(images)
    assert batcher.queued == 0
    assert fake.batches == []


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatcherSettings(max_batch=0)
    with pytest.raises(ValueError, match="max_delay_us"):
        BatcherSettings(max_delay_us=-1)
    with pytest.raises(ValueError, match="max_queue"):
        BatcherSettings(max_batch=8, max_queue=7)


async def test_max_batch_above_the_backends_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the backend"):
        Batcher(FakeBackend(max_batch=4), BatcherSettings(max_batch=8))


async def test_fake_backend_satisfies_the_protocol() -> None:
    assert isinstance(FakeBackend(), Backend)


# --- failures --------------------------------------------------------------------------------


async def test_backend_exception_fails_only_its_batch(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=2, max_delay_us=0)
    fake.fail_on = {10}
    first = await busy(batcher, fake, 1)
    poisoned = spawn(batcher, 10, 11)  # a full batch of its own
    c = spawn(batcher, 20)
    d = spawn(batcher, 21)
    await settle()
    assert batcher.queued == 4
    fake.release()
    assert await asyncio.wait_for(first, TIMEOUT) == [1]
    with pytest.raises(BackendError, match="poisoned batch") as caught:
        await asyncio.wait_for(poisoned, TIMEOUT)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert list(await asyncio.wait_for(asyncio.gather(c, d), TIMEOUT)) == [[20], [21]]
    assert fake.batches == [[1], [10, 11], [20, 21]]
    stats = batcher.stats
    assert (stats.batches_run, stats.failed_batches, stats.failed_images) == (2, 1, 2)
    # Still running afterwards.
    assert result_ids(await asyncio.wait_for(batcher.submit(frames(30)), TIMEOUT)) == [30]


async def test_every_caller_of_a_failed_batch_gets_its_own_backend_error(
    harness: Harness,
) -> None:
    batcher, fake = await harness.make(max_batch=4, max_delay_us=0)
    fake.fail_on = {2}
    fake.error = BackendError
    first = await busy(batcher, fake, 1)
    a = spawn(batcher, 2)
    b = spawn(batcher, 3)
    await settle()
    assert batcher.queued == 2
    fake.release()
    await asyncio.wait_for(first, TIMEOUT)
    outcomes = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), TIMEOUT)
    assert all(isinstance(outcome, BackendError) for outcome in outcomes)
    assert outcomes[0] is not outcomes[1]
    causes = [outcome.__cause__ for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(causes) == 2
    assert causes[0] is causes[1]
    assert isinstance(causes[0], BackendError)
    assert fake.batches == [[1], [2, 3]]


async def test_output_of_the_wrong_shape_fails_the_batch(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4, max_delay_us=0)
    fake.wrong_rows = True
    with pytest.raises(BackendError, match="shape"):
        await asyncio.wait_for(batcher.submit(frames(1, 2)), TIMEOUT)
    fake.wrong_rows = False
    assert result_ids(await asyncio.wait_for(batcher.submit(frames(3)), TIMEOUT)) == [3]


async def test_results_do_not_alias_a_reused_backend_buffer(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4, max_delay_us=0)
    fake.reuse_output = True
    (first,) = await asyncio.wait_for(batcher.submit(frames(1)), TIMEOUT)
    (second,) = await asyncio.wait_for(batcher.submit(frames(2)), TIMEOUT)
    assert result_ids([first, second]) == [1, 2]
    assert not first.probabilities.flags.writeable


# --- lifecycle -------------------------------------------------------------------------------


async def test_close_drains_queued_and_running_work_then_refuses(harness: Harness) -> None:
    # A 60 s delay: close must dispatch what is queued without waiting for company.
    batcher, fake = await harness.make(max_batch=2, max_delay_us=60_000_000)
    running = await busy(batcher, fake, 1, 2)
    queued = spawn(batcher, 3)
    await settle()
    assert batcher.queued == 1
    closing = asyncio.ensure_future(batcher.close())
    await settle()
    assert batcher.closed
    with pytest.raises(BatcherClosedError):
        await batcher.submit(frames(4))
    assert not closing.done()
    fake.release()
    await asyncio.wait_for(closing, TIMEOUT)
    assert await running == [1, 2]
    assert await queued == [3]
    assert fake.batches == [[1, 2], [3]]
    with pytest.raises(BatcherClosedError):
        await batcher.submit(frames(5))
    await batcher.close()  # idempotent
    # The worker thread is gone, and the batcher left the backend to its owner.
    assert fake.threads.isdisjoint(t.ident for t in threading.enumerate())
    assert not fake.closed


async def test_cancelled_close_still_drains(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=2, max_delay_us=0)
    running = await busy(batcher, fake, 1)
    closing = asyncio.ensure_future(batcher.close())
    await settle()
    assert batcher.closed
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    fake.release()
    assert await asyncio.wait_for(running, TIMEOUT) == [1]
    await asyncio.wait_for(batcher.close(), TIMEOUT)


async def test_submit_before_start_and_start_after_close() -> None:
    batcher = Batcher(FakeBackend(max_batch=4), BatcherSettings(max_batch=4))
    with pytest.raises(RuntimeError, match="not started"):
        await batcher.submit(frames(1))
    await batcher.close()
    with pytest.raises(BatcherClosedError):
        await batcher.start()
    with pytest.raises(BatcherClosedError):
        await batcher.submit(frames(1))


async def test_start_twice_is_refused(harness: Harness) -> None:
    batcher, _ = await harness.make()
    with pytest.raises(RuntimeError, match="already started"):
        await batcher.start()


# --- fair order between callers, memory budget, reserves -------------------------------------

FRAME = SIZE * SIZE * 3  # bytes of one test image


async def test_a_caller_with_one_request_is_not_queued_behind_a_greedy_one(
    harness: Harness,
) -> None:
    batcher, fake = await harness.make(max_batch=2, max_queue=64)
    first = await busy(batcher, fake, 1)
    greedy = [spawn(batcher, 100 + i, caller="greedy") for i in range(12)]
    await settle()
    polite = spawn(batcher, 7, caller="polite")
    await settle()
    fake.release()
    await asyncio.wait_for(asyncio.gather(first, polite, *greedy), TIMEOUT)
    # The polite request rides in the first batch after the one computing, not the seventh.
    assert fake.batches[1] == [100, 7]
    # Each caller's own requests stay in order.
    greedy_seen = [i for batch in fake.batches for i in batch if i >= 100]
    assert greedy_seen == sorted(greedy_seen)


async def test_callers_share_batches_in_turn_counted_in_images(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=4, max_queue=64)
    first = await busy(batcher, fake, 1)
    big = [spawn(batcher, 100 + 4 * i, 101 + 4 * i, 102 + 4 * i, 103 + 4 * i, caller="b")
           for i in range(3)]  # fmt: skip
    small = [spawn(batcher, 200 + i, caller="s") for i in range(8)]
    await settle()
    fake.release()
    await asyncio.wait_for(asyncio.gather(first, *big, *small), TIMEOUT)
    # Fair by images: 4 small images go for each 4-image request, not 1 for 1.
    assert fake.batches[1:5] == [
        [100, 101, 102, 103],
        [200, 201, 202, 203],
        [104, 105, 106, 107],
        [204, 205, 206, 207],
    ]


async def test_the_memory_budget_refuses_work_at_once_and_frees_it_when_done(
    harness: Harness,
) -> None:
    batcher, fake = await harness.make(max_batch=2, max_queue=64, memory_budget_bytes=4 * FRAME)
    first = await busy(batcher, fake, 1)
    queued = [spawn(batcher, 10 + i) for i in range(3)]
    await settle()
    assert batcher.admitted_bytes == 4 * FRAME  # computing and waiting both count
    with pytest.raises(QueueFullError, match="memory budget"):
        await asyncio.wait_for(batcher.submit(frames(50)), 1.0)
    fake.release()
    await asyncio.wait_for(asyncio.gather(first, *queued), TIMEOUT)
    assert batcher.admitted_bytes == 0
    assert batcher.stats.callers == 0


async def test_a_greedy_caller_cannot_take_the_last_quarter(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=2, max_queue=16)
    first = await busy(
        batcher,
        fake,
        1,
    )
    greedy = [batcher.submit_nowait(frames(100 + i), caller="greedy") for i in range(12)]
    with pytest.raises(QueueFullError, match="kept for others"):
        batcher.submit_nowait(frames(112), caller="greedy")
    assert batcher.queued == 12  # 16 - 16 // 4: the rest is kept for modest callers
    polite = [batcher.submit_nowait(frames(200 + i), caller=f"camera-{i}") for i in range(4)]
    assert batcher.queued == 16
    fake.release()
    await asyncio.wait_for(asyncio.gather(first, *greedy, *polite), TIMEOUT)


async def test_wait_for_room_returns_once_work_finishes(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=1, max_queue=64, memory_budget_bytes=2 * FRAME)
    first = await busy(batcher, fake, 1)
    second = batcher.submit_nowait(frames(2), caller="s")
    assert not batcher.has_room(frames(3), caller="s")
    waiting = asyncio.ensure_future(batcher.wait_for_room(frames(3), caller="s"))
    await settle()
    assert not waiting.done()
    fake.release()
    await asyncio.wait_for(waiting, TIMEOUT)
    assert batcher.has_room(frames(3), caller="s")
    await asyncio.wait_for(asyncio.gather(first, second), TIMEOUT)


async def test_wait_for_room_ends_when_the_batcher_closes(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=1, max_queue=64, memory_budget_bytes=FRAME)
    first = await busy(batcher, fake, 1)
    waiting = asyncio.ensure_future(batcher.wait_for_room(frames(2)))
    await settle()
    closing = asyncio.ensure_future(batcher.close())
    with pytest.raises(BatcherClosedError):
        await asyncio.wait_for(waiting, TIMEOUT)
    fake.release()
    await asyncio.wait_for(asyncio.gather(first, closing), TIMEOUT)


async def test_finished_and_withdrawn_requests_let_go_of_their_images(harness: Harness) -> None:
    batcher, fake = await harness.make(max_batch=1, max_queue=64)
    first = await busy(batcher, fake, 1)
    kept, dropped = frames(2), frames(3)
    refs = [weakref.ref(kept), weakref.ref(dropped)]
    done = batcher.submit_nowait(kept)
    withdrawn = batcher.submit_nowait(dropped)
    del kept, dropped
    withdrawn.cancel()
    fake.release()
    await asyncio.wait_for(asyncio.gather(first, done), TIMEOUT)
    # The results are still held here; the images they came from are not.
    assert done.result()
    assert [ref() for ref in refs] == [None, None]
