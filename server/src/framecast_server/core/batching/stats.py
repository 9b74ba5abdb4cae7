"""The batcher's statistics: counters kept as work goes by, and their snapshot."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatcherStats:
    """A snapshot of the batcher's counters; every count is in images unless it says batches."""

    queued: int  # waiting now
    batches_run: int  # successful backend.infer calls
    images_run: int
    failed_batches: int  # backend.infer calls that raised
    failed_images: int
    dropped_expired: int  # deadline passed before compute (including on arrival)
    dropped_cancelled: int  # caller cancelled while queued
    rejected_full: int  # refused with QueueFullError (queue or memory budget)
    admitted_bytes: int  # bytes of images admitted now (waiting or computing)
    callers: int  # callers with images admitted now
    # Cumulative durations of the images run, in nanoseconds (for protocols' statistics):
    queue_ns: int = 0  # admission to dispatch, summed over images
    compute_ns: int = 0  # their batch's backend.infer, summed over images
    last_run_unix_ns: int = 0  # wall-clock time the last batch finished; 0 before the first


class Counters:
    """What happened so far, counted by the queue (drops, refusals) and the batcher (runs).

    Plain attributes, bumped on the event loop: the hot path pays one attribute per count.
    """

    __slots__ = (
        "batches_run",
        "compute_ns",
        "dropped_cancelled",
        "dropped_expired",
        "failed_batches",
        "failed_images",
        "images_run",
        "last_run_unix_ns",
        "queue_ns",
        "rejected_full",
    )

    def __init__(self) -> None:
        self.batches_run = 0
        self.images_run = 0
        self.failed_batches = 0
        self.failed_images = 0
        self.dropped_expired = 0
        self.dropped_cancelled = 0
        self.rejected_full = 0
        self.queue_ns = 0
        self.compute_ns = 0
        self.last_run_unix_ns = 0

    def snapshot(self, *, queued: int, admitted_bytes: int, callers: int) -> BatcherStats:
        """The counters, with the queue's state now."""
        return BatcherStats(
            queued=queued,
            batches_run=self.batches_run,
            images_run=self.images_run,
            failed_batches=self.failed_batches,
            failed_images=self.failed_images,
            dropped_expired=self.dropped_expired,
            dropped_cancelled=self.dropped_cancelled,
            rejected_full=self.rejected_full,
            admitted_bytes=admitted_bytes,
            callers=callers,
            queue_ns=self.queue_ns,
            compute_ns=self.compute_ns,
            last_run_unix_ns=self.last_run_unix_ns,
        )
