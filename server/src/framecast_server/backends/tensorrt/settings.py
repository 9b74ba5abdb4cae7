"""What an engine is built for: batch profile, workspace, optimization level, precision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IMAGE_SIZE = 224
CHANNELS = 3
NUM_CLASSES = 1000
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"

# Past this a single batch's pinned input alone passes 600 MB; nothing in Framecast needs more.
MAX_SUPPORTED_BATCH = 4096


def _is_int(value: object) -> bool:
    # bool is an int subclass; EngineSettings(max_batch=True) is a bug, not a batch of 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How to build the TensorRT engine.

    ``opt_batch`` defaults to ``max_batch``. TensorRT picks its kernels for the *opt* shape
    and uses them for every batch size in the profile, so opt should be the size whose speed
    matters. Under load the batcher fills batches up to ``max_batch`` and that is where
    throughput is decided; at low load batches are small but the GPU is idle anyway, so a
    slightly slower kernel at N=1 costs latency in microseconds, not throughput.
    """

    max_batch: int = 32
    opt_batch: int | None = None
    workspace_bytes: int = 1 << 30
    builder_optimization_level: int = 3
    precision: Literal["fp16"] = "fp16"

    def __post_init__(self) -> None:
        if not _is_int(self.max_batch) or not 1 <= self.max_batch <= MAX_SUPPORTED_BATCH:
            raise ValueError(
                f"max_batch must be an int in 1..{MAX_SUPPORTED_BATCH}, got {self.max_batch!r}"
            )
        if self.opt_batch is not None and (
            not _is_int(self.opt_batch) or not 1 <= self.opt_batch <= self.max_batch
        ):
            raise ValueError(
                f"opt_batch must be an int in 1..max_batch ({self.max_batch}), "
                f"got {self.opt_batch!r}"
            )
        if not _is_int(self.workspace_bytes) or self.workspace_bytes <= 0:
            raise ValueError(
                f"workspace_bytes must be a positive int, got {self.workspace_bytes!r}"
            )
        if (
            not _is_int(self.builder_optimization_level)
            or not 0 <= self.builder_optimization_level <= 5
        ):
            raise ValueError(
                "builder_optimization_level must be an int in 0..5, "
                f"got {self.builder_optimization_level!r}"
            )
        if self.precision != "fp16":
            raise ValueError(f"precision must be 'fp16', got {self.precision!r}")

    @property
    def min_batch(self) -> int:
        """Smallest batch the profile accepts: always 1 (the batcher may send one image)."""
        return 1

    @property
    def effective_opt_batch(self) -> int:
        """The profile's opt batch: ``opt_batch`` if given, else ``max_batch``."""
        return self.max_batch if self.opt_batch is None else self.opt_batch

    @property
    def profile(self) -> tuple[int, int, int]:
        """(min, opt, max) batch of the one optimization profile."""
        return (self.min_batch, self.effective_opt_batch, self.max_batch)

    def input_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) NHWC shapes of the ``images`` input for the optimization profile."""
        lo, opt, hi = self.profile
        return (
            (lo, IMAGE_SIZE, IMAGE_SIZE, CHANNELS),
            (opt, IMAGE_SIZE, IMAGE_SIZE, CHANNELS),
            (hi, IMAGE_SIZE, IMAGE_SIZE, CHANNELS),
        )
