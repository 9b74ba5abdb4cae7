"""Backpressure of a realtime session: the server's rate hint, and the frames skipped at capture.

The server states in its answers the rate it can serve this stream now and the frames it can
have in flight within the max age (a FlowHint). A realtime session that follows the hints
(``follow_hints``) takes frames at most at that rate, skipping the others before they are
prepared or sent, and keeps no more in flight than the hint says.
"""

from __future__ import annotations

from .._proto import classifier_pb2 as pb


class Pacer:
    """The last rate hint, and when the next frame may be taken. Not thread-safe: the core's
    lock guards it."""

    def __init__(self, *, enabled: bool, max_in_flight: int) -> None:
        self._enabled = enabled
        self._max_in_flight = max_in_flight
        self.rate_hint = 0.0
        self.window = max_in_flight  # lowered to the hint's max_in_flight
        # The earliest capture time at which the next frame is taken at the hinted rate.
        self._next_take = 0.0

    def on_hint(self, hint: pb.FlowHint) -> None:
        """A hint came with an answer."""
        self.rate_hint = hint.rate_fps
        if self._enabled:
            self.window = min(self._max_in_flight, max(1, hint.max_in_flight))

    def reset(self) -> None:
        """The call broke: the server (perhaps another one) states the hint afresh."""
        self.rate_hint = 0.0
        self.window = self._max_in_flight

    def skip(self, captured: float) -> bool:
        """Whether a frame captured at ``captured`` exceeds the rate hint (and is skipped).

        Frames are taken at most one per 1 / rate seconds, with one interval of slack so that
        a camera whose frame times do not divide the interval still gets the full rate.
        """
        rate = self.rate_hint
        if not self._enabled or rate <= 0:
            return False
        if captured < self._next_take:
            return True
        interval = 1.0 / rate
        self._next_take = max(self._next_take + interval, captured - interval + 1e-9)
        if self._next_take <= captured:
            self._next_take = captured + interval
        return False
