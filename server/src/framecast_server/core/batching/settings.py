"""What a batcher's user configures and gets back: settings, per-image results, errors."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# Who a request is for, as far as fairness goes: any hashable key the servicer chooses.
Caller = Hashable
# The default memory budget: about 1,700 preprocessed 224x224 frames.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 1024 * 1024


class QueueFullError(Exception):
    """The queue has no room for all images of the request; nothing of it was admitted."""


class BatcherClosedError(Exception):
    """The batcher is closed (or closing) and admits no more work."""


class DeadlineExpiredError(Exception):
    """The request's deadline passed before its images were run; they were never computed."""


@dataclass(frozen=True, slots=True)
class BatcherSettings:
    """How the batcher trades latency for throughput.

    ``max_batch`` must not exceed the backend's ``max_batch``; ``max_queue`` must be at least
    ``max_batch`` so that any valid request can be admitted into an empty queue.
    """

    max_batch: int = 32
    # Wait at most this long after the oldest queued request for more. 0 (as Triton's default)
    # dispatches at once when the worker is free; batches still form from what queues while a
    # batch computes, so waiting only adds latency unless the backend idles between arrivals.
    max_delay_us: int = 0
    max_queue: int = 256  # images waiting (not counting the batch computing)
    # Bytes of images admitted (waiting or computing): what bounds the server's memory.
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {self.max_batch}")
        if self.max_delay_us < 0:
            raise ValueError(f"max_delay_us must not be negative, not {self.max_delay_us}")
        if self.max_queue < self.max_batch:
            raise ValueError(
                f"max_queue ({self.max_queue}) must be at least max_batch ({self.max_batch})"
            )
        if self.memory_budget_bytes < 1:
            raise ValueError(
                f"memory_budget_bytes must be positive, not {self.memory_budget_bytes}"
            )


@dataclass(frozen=True, slots=True)
class ItemResult:
    """The result for one image.

    ``probabilities`` is a read-only float32 [C] row. ``queue_us`` is the time from admission to
    the batch being taken from the queue, ``compute_us`` the duration of the batch's
    ``backend.infer`` call, ``batch_size`` the number of images in that batch.
    """

    probabilities: NDArray[np.float32]
    queue_us: int
    compute_us: int
    batch_size: int
