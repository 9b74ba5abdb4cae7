"""Through gRPC: a client flooding the server cannot push a polite one out or to the back.

A caller is its token's name (else its host): the greedy and polite clients hold different
tokens. The backend is held while the greedy client floods, so the order in which calls were
admitted and batched is visible in what the backend saw.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from framecast_client import Client, ResourceExhaustedError, wire
from framecast_server.process.background import BackgroundServer
from numpy.typing import NDArray
from support import (
    GatedBackend,
    RawClassifier,
    make_settings,
    random_frames,
    wait_until,
    write_tokens,
)

WAIT_S = 30.0
POLITE_KEY = 200


def keyed(key: int) -> NDArray[np.uint8]:
    image = random_frames(1, seed=key)
    image[0, 0, 0, 0] = key
    return image


def test_a_polite_client_is_admitted_and_served_next_while_a_greedy_one_floods(
    cache_dir: Path, tmp_path: Path
) -> None:
    # The batcher's own fair order, with admission wide open (as --max-unary-calls 64): the
    # greedy client's calls all reach the batcher, which refuses what is beyond its share.
    backend = GatedBackend(max_batch=4)
    backend.release.set()  # the warm-up batch
    settings = make_settings(
        cache_dir,
        backend="null",
        max_batch=4,
        max_queue=16,
        max_streams_per_connection=32,
        max_unary_calls=64,
        auth_tokens=write_tokens(tmp_path / "tokens", "greedy", "polite"),
    )
    with (
        BackgroundServer(settings, backend_factory=lambda _: backend) as server,
        Client(server.address, timeout=WAIT_S, token="greedy-secret") as greedy,
        ThreadPoolExecutor(32) as pool,
    ):
        polite = RawClassifier(server.address, own_connection=True, token="polite-secret")
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


def test_a_greedy_caller_over_many_connections_waits_unread_and_the_polite_one_goes_next(
    cache_dir: Path, tmp_path: Path
) -> None:
    # 24 calls over 8 connections from one caller: 4 are admitted (--max-unary-calls), the
    # rest wait unread and unanswered (none refused, so none comes back); the polite
    # caller's one call, holding no place, takes the spare place on arrival, ahead of the
    # greedy caller's 20.
    backend = GatedBackend(max_batch=4)
    backend.release.set()  # the warm-up batch
    settings = make_settings(
        cache_dir,
        backend="null",
        max_batch=4,
        max_queue=8,
        max_unary_calls=4,
        auth_tokens=write_tokens(tmp_path / "tokens", "greedy", "polite"),
    )
    with (
        BackgroundServer(settings, backend_factory=lambda _: backend) as server,
        ThreadPoolExecutor(32) as pool,
    ):
        admission = server.server.admission
        greedy = [
            RawClassifier(server.address, own_connection=True, token="greedy-secret")
            for _ in range(8)
        ]
        polite = RawClassifier(server.address, own_connection=True, token="polite-secret")
        assert polite.status("get_model_info", b"")[0] is grpc.StatusCode.OK
        backend.release.clear()
        backend.entered.clear()
        backend.seen.clear()
        flood = [
            pool.submit(
                greedy[i % 8].status,
                "classify",
                wire.classify_request_bytes(keyed(10 + i), top_k=1),
            )
            for i in range(24)
        ]
        wait_until(
            lambda: admission.admitted == 4 and admission.waiting_for("greedy") == 20,
            "the greedy caller's excess did not wait",
        )
        assert not any(call.done() for call in flood)  # none refused
        request = wire.classify_request_bytes(keyed(POLITE_KEY), top_k=1)
        answer = pool.submit(polite.status, "classify", request)
        wait_until(
            lambda: admission.admitted_for("polite") == 1, "the polite call was not admitted"
        )
        assert admission.admitted == 5
        assert admission.waiting_for("greedy") == 20
        admitted_before = admission.admitted_total
        backend.release.set()
        assert answer.result(WAIT_S)[0] is grpc.StatusCode.OK
        assert [call.result(WAIT_S)[0] for call in flood] == [grpc.StatusCode.OK] * 24
        for client in [*greedy, polite]:
            client.close()
    assert admission.admitted_total == admitted_before + 20
    # The polite frame came right after (at most) the four admitted first, not behind the 20
    # waiting: how many of the four rode in the held batch depends on when they were read.
    assert sorted(backend.seen) == sorted([*range(10, 34), POLITE_KEY])
    assert backend.seen.index(POLITE_KEY) <= 4, backend.seen


def test_anonymous_connections_from_one_host_are_one_caller(cache_dir: Path) -> None:
    # No tokens: a caller is its host, so three connections from this one are one caller.
    backend = GatedBackend(max_batch=2)
    backend.release.set()
    settings = make_settings(cache_dir, backend="null", max_batch=2, max_unary_calls=2)
    with (
        BackgroundServer(settings, backend_factory=lambda _: backend) as server,
        ThreadPoolExecutor(8) as pool,
    ):
        admission = server.server.admission
        clients = [RawClassifier(server.address, own_connection=True) for _ in range(3)]
        assert clients[0].status("get_model_info", b"")[0] is grpc.StatusCode.OK
        backend.release.clear()
        request = wire.classify_request_bytes(keyed(1), top_k=1)
        calls = [pool.submit(clients[i % 3].status, "classify", request) for i in range(6)]
        wait_until(lambda: admission.waiting_for("ipv4:127.0.0.1") == 4, "not one caller per host")
        backend.release.set()
        assert [call.result(WAIT_S)[0] for call in calls] == [grpc.StatusCode.OK] * 6
        for client in clients:
            client.close()
