"""Through gRPC: a full queue answers RESOURCE_EXHAUSTED at once, a passed deadline is never run."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from framecast_client import Classification, Client, DeadlineExceededError, ResourceExhaustedError
from framecast_server.process.background import BackgroundServer
from numpy.typing import NDArray
from support import GatedBackend, make_settings, random_frames, wait_until


def frame(key: int) -> NDArray[np.uint8]:
    image = random_frames(1, seed=key)[0]
    image[0, 0, 0] = key
    batch: NDArray[np.uint8] = image[None]
    return batch


Held = tuple[GatedBackend, Client, ThreadPoolExecutor, BackgroundServer]


@pytest.fixture
def held(cache_dir: Path) -> Iterator[Held]:
    backend = GatedBackend(max_batch=2)
    backend.release.set()  # the warm-up batch
    # Several calls of one connection in flight at once, to fill the queue.
    settings = make_settings(
        cache_dir, backend="null", max_batch=2, max_queue=2, max_streams_per_connection=8
    )
    with (
        BackgroundServer(settings, backend_factory=lambda _: backend) as server,
        Client(server.address, timeout=30) as client,
        ThreadPoolExecutor(4) as pool,
    ):
        client.model_info()
        backend.release.clear()
        backend.entered.clear()
        backend.seen.clear()
        yield backend, client, pool, server
        backend.release.set()


def wait_queued(server: BackgroundServer, images: int) -> None:
    serving = server.serving
    assert serving is not None
    wait_until(
        lambda: serving.batcher.queued == images,
        f"{images} images in the queue",
        seen=lambda: f"{serving.batcher.queued} queued",
    )


def test_a_full_queue_is_refused_at_once_and_the_server_recovers(held: Held) -> None:
    backend, client, pool, server = held
    running = pool.submit(client.classify_preprocessed, frame(1))
    assert backend.entered.wait(10)
    queued: list[Future[list[Classification]]] = [
        pool.submit(client.classify_preprocessed, frame(k)) for k in (2, 3)
    ]
    wait_queued(server, 2)
    with pytest.raises(ResourceExhaustedError, match="at capacity"):
        client.classify_preprocessed(frame(4))
    backend.release.set()
    for future in (running, *queued):
        assert len(future.result(timeout=30)) == 1
    assert client.classify_preprocessed(frame(5))[0].top.index >= 0
    assert 4 not in backend.seen


def test_a_request_whose_deadline_passes_in_the_queue_is_never_run(held: Held) -> None:
    backend, client, pool, _ = held
    running = pool.submit(client.classify_preprocessed, frame(1))
    assert backend.entered.wait(10)
    with pytest.raises(DeadlineExceededError):
        client.classify_preprocessed(frame(7), timeout=0.3)
    backend.release.set()
    assert len(running.result(timeout=30)) == 1
    assert client.classify_preprocessed(frame(8))[0].predictions
    assert 7 not in backend.seen
    assert 8 in backend.seen
