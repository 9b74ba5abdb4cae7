"""What a server serves once loaded: the prepared model, its backend and the batcher in front."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from ..backends.base import Backend
from ..model import PreparedModel
from .batcher import BatcherSettings, BatcherStats, Caller, ItemResult


class BatcherLike(Protocol):
    """What the servicers call: a :class:`~.batcher.Batcher`, or with ``--inference shared``
    the proxy to the inference process (shared_inference.InferenceProxy)."""

    @property
    def settings(self) -> BatcherSettings: ...

    @property
    def closed(self) -> bool: ...

    @property
    def stats(self) -> BatcherStats: ...

    @property
    def model_stats(self) -> BatcherStats:
        """The model's statistics host-wide (with ``--inference shared``, the inference
        process's batches, not only this front end's answers)."""
        ...

    @property
    def queued(self) -> int: ...

    @property
    def admitted_bytes(self) -> int: ...

    async def submit(
        self, images: NDArray[np.uint8], *, deadline: float | None = None, caller: Caller = None
    ) -> list[ItemResult]: ...

    def submit_nowait(
        self, images: NDArray[np.uint8], *, deadline: float | None = None, caller: Caller = None
    ) -> asyncio.Future[list[ItemResult]]: ...

    async def wait_for_room(self, images: NDArray[np.uint8], *, caller: Caller = None) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ServingModel:
    """A loaded, warmed-up model ready for calls."""

    model: PreparedModel
    backend: Backend
    batcher: BatcherLike
