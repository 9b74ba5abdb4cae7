"""What a server serves once loaded: the prepared model, its backend and the batcher in front."""

from __future__ import annotations

from dataclasses import dataclass

from .backends.base import Backend
from .batcher import Batcher
from .model import PreparedModel


@dataclass(frozen=True, slots=True)
class ServingModel:
    """A loaded, warmed-up model ready for calls."""

    model: PreparedModel
    backend: Backend
    batcher: Batcher
