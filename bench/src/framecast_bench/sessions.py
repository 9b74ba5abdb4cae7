"""Sessions: how one benchmark worker talks to the server in each mode."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from framecast_client.client import Client
from framecast_client.types import Classification
from numpy.typing import NDArray

from framecast_bench.inputs import Payload
from framecast_bench.plan import (
    BenchPlan,
    ClosedStep,
    OpenStep,
    plan_steps,
    unary_steps,
)
from framecast_bench.runner import (
    Mode,
    SessionFactory,
)
from framecast_bench.stream_runner import (
    client_stream_opener,
    run_stream_closed_step,
    run_stream_open_step,
)


class ClassifySession:
    """Unary and batch modes: one Classify call per payload on a shared client.

    Workers share one client (one channel, HTTP/2 multiplexed), as an application with
    several threads would.
    """

    def __init__(self, client: Client, *, top_k: int, timeout: float | None) -> None:
        self._client = client
        self._top_k = top_k
        self._timeout = timeout

    def send(self, payload: Payload) -> Sequence[Classification]:
        """Classify the payload's images in one request."""
        return self._client.classify_preprocessed(
            payload.batch, top_k=self._top_k, timeout=self._timeout
        )

    def close(self) -> None:
        """Nothing to release: the client belongs to the caller."""


def _carrier(frame: NDArray[np.uint8], client: Client) -> NDArray[np.uint8] | None:
    """A frame the client's preprocessing turns into ``frame`` by slicing only, if any."""
    spec = client.model_info().preprocessing
    candidates = [frame]
    h, w = frame.shape[:2]
    size = spec.resize_size
    if spec.resize_policy == "shorter_side_then_center_crop" and size >= max(h, w):
        # A size x size square needs no resize; its center crop is ``frame`` when placed at
        # the crop's offset (torchvision rounds it half to even; floor tried as well).
        for top, left in {
            (round((size - h) / 2), round((size - w) / 2)),
            ((size - h) // 2, (size - w) // 2),
        }:
            square = np.zeros((size, size, 3), dtype=np.uint8)
            square[top : top + h, left : left + w] = frame
            candidates.append(square)
    for candidate in candidates:
        try:
            if np.array_equal(client.preprocess(candidate), frame):
                return candidate
        except ValueError:
            continue
    return None


def stream_payloads(client: Client, payloads: Sequence[Payload]) -> list[Payload]:
    """Payloads for stream mode, whose frames the session's preprocessing only slices.

    A stream session preprocesses every frame on its own thread. Handing it the already
    preprocessed frame would make it resample that frame again (for the crop policy, up to
    the resize size and back), and on a small client that thread would become what is
    measured. So each frame goes in a carrier the preprocessing maps back to exactly that
    frame without resampling, checked here once per input; a frame without one is sent
    as it is.
    """
    out: list[Payload] = []
    for p in payloads:
        carrier = _carrier(p.batch[0], client)
        batch = p.batch if carrier is None else carrier[None]
        out.append(Payload(batch=batch, preprocess_ms=p.preprocess_ms))
    return out


def mode_steps(
    client: Client,
    mode: Mode,
    payloads: Sequence[Payload],
    plan: BenchPlan,
    *,
    top_k: int,
    timeout: float | None,
) -> tuple[ClosedStep, OpenStep]:
    """The step drivers of ``mode``; raises BenchUnavailableError when it cannot run."""
    if mode in ("unary", "batch"):
        factory: SessionFactory = lambda: ClassifySession(client, top_k=top_k, timeout=timeout)  # noqa: E731
        return unary_steps(factory, payloads, plan)
    opener = client_stream_opener(client, top_k=top_k)
    payloads = stream_payloads(client, payloads)
    return plan_steps(run_stream_closed_step, run_stream_open_step, opener, payloads, plan)
