"""A replica of the secure setup (TLS and tokens) drained under steady unary load costs no call.

Two real servers on loopback, one SDK client balancing over both, several threads calling
Classify without pause; one replica drains as SIGTERM drains it (no drain delay, as in the
pod after its preStop sleep). Its clients must go to the other replica without a single failed
call: the draining replica serves the calls still arriving until the clients have seen its
NOT_SERVING (client-side health checking) and stopped sending, rather than refusing them; each
refusal spent a token of the client's retry throttle, and a few in a row failed calls (8 rounds
of 8 failed so before the fix).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from certs import Certificates
from framecast_client import TLS, Client
from framecast_server.settings import ServerTLS
from support import random_frames, running_server, wait_until, write_tokens

CALLERS = 12
ROUNDS = 8
CALLS = 100  # on each side of the drain
DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = write_tokens(tmp_path_factory.mktemp("tokens") / "tokens.txt", "camera")
    return path, path.read_text().split(":", 1)[1].strip()


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_secure_replica_drained_under_load_costs_no_call(
    round_: int, cache_dir: Path, certificates: Certificates, token: tuple[Path, str]
) -> None:
    token_file, secret = token
    tls = ServerTLS(cert=certificates.server.cert, key=certificates.server.key)
    batch = random_frames(1, seed=round_)
    failures: list[BaseException] = []
    served = [0, 0]  # calls answered before, after the drain began
    done = threading.Event()
    draining = threading.Event()
    with ExitStack() as stack:
        drained, other = (
            stack.enter_context(running_server(cache_dir, tls=tls, auth_tokens=token_file))
            for _ in range(2)
        )
        client = stack.enter_context(
            Client(
                [drained.address, other.address],
                tls=TLS(ca=certificates.ca.cert, server_name="framecast.test"),
                token=secret,
                timeout=30,
            )
        )
        pool = stack.enter_context(ThreadPoolExecutor(CALLERS))

        def call_repeatedly() -> None:
            while not done.is_set():
                try:
                    client.classify_preprocessed(batch)
                except Exception as exc:  # every failure is reported, none stops the load
                    failures.append(exc)
                else:
                    served[draining.is_set()] += 1

        callers = [pool.submit(call_repeatedly) for _ in range(CALLERS)]
        try:
            wait_until(
                lambda: served[0] >= CALLS, f"{CALLS} calls before the drain",
                timeout_s=DEADLINE_S, seen=lambda: (served, failures[:3]),
            )  # fmt: skip
            draining.set()
            # SIGTERM's drain without the drain delay: calls reach the replica as it begins.
            drained.close()
            wait_until(
                lambda: served[1] >= CALLS, f"{CALLS} calls after the drain began",
                timeout_s=DEADLINE_S, seen=lambda: (served, failures[:3]),
            )  # fmt: skip
        finally:
            done.set()
            for caller in callers:
                caller.result(timeout=DEADLINE_S)
    assert failures == [], f"{len(failures)} failed calls, first: {failures[:3]}"
