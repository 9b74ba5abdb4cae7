"""--max-connection-age: the server ends every connection after its age (GOAWAY, then a close
after the grace); the SDK's reconnection keeps that invisible to unary calls and lossless
streams. A real server with a 1 s age, over several ages, under load."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from framecast_client import Backoff, Client, StreamResult
from framecast_server.process.background import BackgroundServer
from numpy.typing import NDArray
from support import INPUT_SIZE, make_settings

AGE_S = 1.0
# Shorter than a stream lives, so that streams are cut and must reconnect, not just finish.
GRACE_S = 0.5
RUN_S = 5.0  # about 4 ages (gRPC jitters each by +-10%)
FRAME_SIZE = 32
UNARY_THREADS = 3


def keyed(key: int, size: int = FRAME_SIZE) -> NDArray[np.uint8]:
    """Every pixel ``key``: the null backend's top class is then ``key``."""
    return np.full((size, size, 3), key % 256, dtype=np.uint8)


def paced_frames(stop: threading.Event) -> Iterator[NDArray[np.uint8]]:
    i = 0
    while not stop.is_set():
        yield keyed(i)
        i += 1
        time.sleep(0.01)


def test_connections_end_at_their_age_and_no_call_or_frame_is_lost(
    cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framecast_client.streaming.drive")
    settings = make_settings(
        cache_dir,
        backend="null",
        max_batch=32,
        max_connection_age_s=AGE_S,
        max_connection_age_grace_s=GRACE_S,
    )
    stop = threading.Event()
    calls: list[int] = []
    failures: list[BaseException] = []

    def unary_load(client: Client, seed: int) -> None:
        i = seed
        while not stop.is_set():
            try:
                (result,) = client.classify_preprocessed(keyed(i, INPUT_SIZE)[None])
                assert result.predictions[0].index == i % 256
                calls.append(i)
            except BaseException as exc:  # every failure is one the test reports
                failures.append(exc)
                return
            i += 7

    with BackgroundServer(settings) as server, Client(server.address, timeout=30) as client:
        threads = [
            threading.Thread(target=unary_load, args=(client, n)) for n in range(UNARY_THREADS)
        ]
        for thread in threads:
            thread.start()
        results: list[StreamResult] = []
        timer = threading.Timer(RUN_S, stop.set)
        timer.start()
        try:
            backoff = Backoff(initial_s=0.05, max_s=0.5)
            with client.stream(paced_frames(stop), mode="lossless", backoff=backoff) as session:
                results.extend(session)
                stats = session.stats
        finally:
            stop.set()
            timer.cancel()
            for thread in threads:
                thread.join(60)
    assert not failures, failures[:3]
    assert len(calls) > 50
    # Lossless: every frame once, in order, with its own answer.
    assert [r.index for r in results] == list(range(len(results)))
    assert len(results) > 100
    for result in results:
        assert result.classification.predictions[0].index == result.index % 256
    assert stats.dropped == stats.errors == 0
    # The ages took effect: the stream's connection ended (and it reconnected) several times,
    # as routine, at once and without a warning. (A send racing the close can surface as a
    # reset instead, which takes the usual backoff; lossless all the same.)
    assert stats.reconnects >= 2, stats
    aged = [r for r in caplog.records if "maximum connection age" in r.getMessage()]
    assert len(aged) >= 2
    assert all(r.levelno == logging.INFO for r in aged)
