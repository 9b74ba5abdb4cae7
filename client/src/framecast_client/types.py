"""Typed results returned by the client."""

from __future__ import annotations

from dataclasses import dataclass

from .preprocess import PreprocessSpec


@dataclass(frozen=True, slots=True)
class Prediction:
    """One class of a result: its ImageNet index, label and probability."""

    index: int
    label: str
    probability: float


@dataclass(frozen=True, slots=True)
class ServerTiming:
    """Where the server spent its time on one image, in milliseconds."""

    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass(frozen=True, slots=True)
class Classification:
    """The top-k predictions for one image, best first."""

    predictions: tuple[Prediction, ...]
    timing: ServerTiming | None = None

    @property
    def top(self) -> Prediction:
        """The most probable class."""
        return self.predictions[0]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the server serves, as GetModelInfo reports it."""

    name: str
    version: str
    backend: str
    precision: str
    max_batch: int
    preprocessing: PreprocessSpec
    normalization: str
    pretrained: bool
    weights_source: str
    warning: str
    labels: tuple[str, ...]
    max_message_bytes: int
    # What requests state so that images prepared for another model are refused ("": unknown).
    preprocessing_id: str = ""
    # The image encodings the server accepts ("raw", "jpeg", "png"); raw always.
    encodings: tuple[str, ...] = ("raw",)
    # Calls the server runs at once on one connection (0: not stated); the client opens more
    # connections rather than queue behind this limit.
    max_calls_per_connection: int = 0
