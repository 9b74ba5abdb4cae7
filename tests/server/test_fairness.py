"""Through gRPC: a client flooding the server cannot push a polite one out or to the back.

Callers are connections: the greedy client's calls share one channel, the polite client has
its own. The backend is held while the greedy client fills the queue, so the order the batcher
chose is visible in what the backend saw. The server lets one connection run 32 calls at once,
as a deployment behind a proxy that multiplexes many calls would: at the default of 4 a flood
waits on its own side and never reaches the batcher.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from framecast_client import Client, ResourceExhaustedError, wire
from framecast_server.background import BackgroundServer
from numpy.typing import NDArray
from support import GatedBackend, RawClassifier, make_settings, random_frames, wait_until

WAIT_S = 30.0
POLITE_KEY = 200


def keyed(key: int) -> NDArray[np.uint8]:
    image = random_frames(1, seed=key)
    image[0, 0, 0, 0] = key
    return image


def test_a_polite_client_is_admitted_and_served_next_while_a_greedy_one_floods(
    cache_dir: Path,
) -> None:
    backend = GatedBackend(max_batch=4)
    backend.release.set()  # the warm-up batch
    settings = make_settings(
        cache_dir, backend="null", max_batch=4, max_queue=16, max_streams_per_connection=32
    )
    with (
        BackgroundServer(settings, backend_factory=lambda _: backend) as server,
        Client(server.address, timeout=WAIT_S) as greedy,
        ThreadPoolExecutor(32) as pool,
    ):
        polite = RawClassifier(server.address, own_connection=True)
        serving = server.serving
        assert serving is not None
        greedy.model_info()
        assert polite.status("get_model_info", b"")[0] is grpc.StatusCode.OK
        backend.release.clear()
        backend.entered.clear()
        backend.seen.clear()
        first = pool.submit(greedy.classify_preprocessed, keyed(1))
        assert backend.entered.wait(WAIT_S)
        flood = [pool.submit(greedy.classify_preprocessed, keyed(10 + i)) for i in range(24)]
        # The greedy client fills three quarters of the queue and is refused the rest at once.
        wait_until(lambda: sum(call.done() for call in flood) == 12, "the flood was not refused")
        assert serving.batcher.queued == 12
        refused = [call.exception() for call in flood if call.done()]
        assert all(isinstance(error, ResourceExhaustedError) for error in refused)
        # The polite one is admitted into the quarter kept for modest callers.
        request = wire.classify_request_bytes(keyed(POLITE_KEY), top_k=1)
        answer = pool.submit(polite.status, "classify", request)
        wait_until(lambda: serving.batcher.queued == 13 or answer.done(), "never admitted")
        assert not answer.done(), answer.exception()
        backend.release.set()
        assert answer.result(WAIT_S)[0] is grpc.StatusCode.OK
        first.result(WAIT_S)
        polite.close()
    # The polite frame rode in the first batch after the one that was held, not behind the
    # greedy client's eleven queued frames.
    assert POLITE_KEY in backend.seen[1:5], backend.seen
