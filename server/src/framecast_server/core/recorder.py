"""What the core tells the metrics: a tiny recording interface, and a no-op default.

The batcher and the servicers call a :class:`Recorder` at a few points; an exporter
(``framecast_server.metrics``, Prometheus) implements it. Nothing here imports grpc or a
metrics library, so the core stays free of both, and a server without metrics pays one
no-op call per batch and per answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Recorder(Protocol):
    """Receives what the core knows as it happens; implementations must be cheap."""

    def batch_done(self, size: int, compute_ns: int, queue_ns: Sequence[int]) -> None:
        """A batch of ``size`` images ran in ``compute_ns``; ``queue_ns``: each image's wait."""

    def frames_answered(self, method: str, code: str, n: int) -> None:
        """``n`` images of one call to ``method`` were answered with status ``code``.

        ``code`` is a gRPC status name ("OK", "INVALID_ARGUMENT", ...); a stream's frames are
        answered one by one, each with its own code.
        """

    def frame_age(self, at_admission_us: int, at_compute_us: int | None) -> None:
        """A stream frame's age when admitted and when its batch started (None: not computed)."""

    def frames_dropped(self, reason: str, n: int) -> None:
        """``n`` stream frames dropped unanswered for ``reason`` ("stale_at_admission", ...)."""


class NullRecorder:
    """Records nothing: the default when metrics are off."""

    def batch_done(self, size: int, compute_ns: int, queue_ns: Sequence[int]) -> None:
        """Nothing to do."""

    def frames_answered(self, method: str, code: str, n: int) -> None:
        """Nothing to do."""

    def frame_age(self, at_admission_us: int, at_compute_us: int | None) -> None:
        """Nothing to do."""

    def frames_dropped(self, reason: str, n: int) -> None:
        """Nothing to do."""


NULL_RECORDER: Recorder = NullRecorder()
