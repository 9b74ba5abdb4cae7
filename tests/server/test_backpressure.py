"""Through gRPC: a full queue answers RESOURCE_EXHAUSTED at once, a passed deadline is never run.

Each test runs against an in-process server and against `serve --workers 2 --inference shared`
(the queue is then the inference process's, shared by both front ends).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest
from framecast_client import Classification, Client, DeadlineExceededError, ResourceExhaustedError
from numpy.typing import NDArray
from support import ServedHost, random_frames, wait_until


def frame(key: int) -> NDArray[np.uint8]:
    image = random_frames(1, seed=key)[0]
    image[0, 0, 0] = key
    batch: NDArray[np.uint8] = image[None]
    return batch


Held = tuple[ServedHost, Client, ThreadPoolExecutor]


@pytest.fixture
def held(start_host: Callable[..., ServedHost]) -> Iterator[Held]:
    # Several calls of one connection in flight at once, to fill the queue.
    host = start_host(max_batch=2, max_queue=2, max_streams_per_connection=8)
    with Client(host.address, timeout=30) as client, ThreadPoolExecutor(4) as pool:
        client.model_info()
        host.hold()
        yield host, client, pool
        host.release()


def wait_queued(host: ServedHost, images: int) -> None:
    wait_until(
        lambda: host.queued() == images,
        f"{images} images in the queue",
        seen=lambda: f"{host.queued()} queued",
    )


def test_a_full_queue_is_refused_at_once_and_the_server_recovers(held: Held) -> None:
    host, client, pool = held
    running = pool.submit(client.classify_preprocessed, frame(1))
    assert host.wait_entered(10)
    queued: list[Future[list[Classification]]] = [
        pool.submit(client.classify_preprocessed, frame(k)) for k in (2, 3)
    ]
    wait_queued(host, 2)
    with pytest.raises(ResourceExhaustedError, match="at capacity"):
        client.classify_preprocessed(frame(4))
    host.release()
    for future in (running, *queued):
        assert len(future.result(timeout=30)) == 1
    assert client.classify_preprocessed(frame(5))[0].top.index >= 0
    assert 4 not in host.seen()


def test_a_request_whose_deadline_passes_in_the_queue_is_never_run(held: Held) -> None:
    host, client, pool = held
    running = pool.submit(client.classify_preprocessed, frame(1))
    assert host.wait_entered(10)
    with pytest.raises(DeadlineExceededError):
        client.classify_preprocessed(frame(7), timeout=0.3)
    host.release()
    assert len(running.result(timeout=30)) == 1
    assert client.classify_preprocessed(frame(8))[0].predictions
    assert 7 not in host.seen()
    assert 8 in host.seen()
