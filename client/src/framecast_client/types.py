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


@dataclass(frozen=True, slots=True)
class StreamView:
    """One stream a server runs now, as its ListStreams reports it (``framecast top``).

    Rates and percentiles cover the stream's last second and last 256 frames on the server;
    latency is from the server receiving a frame to answering it, age is the frame's age when
    its compute started (the client's capture-to-send time plus the server's own time).
    """

    id: int
    caller: str
    name: str
    started_unix_s: float
    frames_in_per_s: float
    frames_out_per_s: float
    p99_latency_ms: float
    p99_age_ms: float
    frames_in: int
    frames_out: int
    dropped: int
    max_age_ms: int
    rate_hint_fps: float
