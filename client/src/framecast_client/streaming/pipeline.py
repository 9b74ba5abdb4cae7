"""The pipeline of one session, shared by the blocking and the asyncio session.

The buffers between the stages, the frames in flight, the drop policy (realtime) and the
resend policy (lossless), and the counters. The reader and preprocess threads that feed it are
``intake``'s, the rate hint's pacing is ``pacing``'s, and the sessions only run the call: a
thread (``StreamSession``) or a task (``AsyncStreamSession``), each carrying out ``drive``.

Why :class:`StreamCore` is one class of about 350 lines: it is the state behind one lock, and
each of its methods is one step of a frame through the same four buffers (raw, ready, in
flight, output) and the same counters. Split further, the pieces would share that lock and
reach into each other's buffers; what has state of its own is already apart (``intake``,
``pacing``, ``results.Counters``, ``drive``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._proto import classifier_pb2 as pb
from ..preprocess import ImageInput, PreprocessSpec
from ..types import Classification
from .config import StreamConfig
from .intake import Intake, prepare
from .pacing import Pacer
from .results import Counters, FrameError, StreamResult, StreamStats, frame_outcome

logger = logging.getLogger(__name__)

# Results the user has not taken yet, beyond the frames in flight: past that, answers are not
# read, so in-flight slots stay taken and a slow consumer slows (realtime: drops) the stream
# instead of queueing results without bound.
_OUTPUT_SLACK = 8


class Signal:
    """A sentinel returned by the non-blocking core methods."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


WAIT = Signal("WAIT")  # nothing to do yet: wait for the next change
END = Signal("END")  # nothing more will come


def result_or_raise(item: StreamResult | BaseException | Signal) -> StreamResult | None:
    """What the user's iteration gets from ``pop_locked``: the result, or None at the end;
    raises the failure that ended the stream."""
    if isinstance(item, BaseException):
        raise item
    return item if isinstance(item, StreamResult) else None


@dataclass(slots=True)
class _Raw:
    index: int
    frame: Any
    captured: float


@dataclass(slots=True)
class _Ready:
    frame_id: int
    index: int
    captured: float
    request: pb.StreamRequest | None  # None when preprocessing failed
    error: FrameError | None
    # Lossless only: the source frame, kept until its answer so that it can be prepared again
    # when the server comes back wanting other preprocessing (realtime drops such frames).
    source: Any = None


@dataclass(frozen=True, slots=True)
class _Job:
    """A frame for the preprocess thread, and the preprocessing it is prepared for."""

    raw: _Raw
    spec: PreprocessSpec
    preprocessing_id: str
    spec_version: int


@dataclass(slots=True)
class _Outstanding:
    item: _Ready
    sent: bool
    result: StreamResult | None = None


class StreamCore:
    """The state of one session: buffers, in-flight frames, counters, and the two threads.

    Every method whose name ends in ``_locked`` must be called with ``lock`` held; the others
    take it. Every change calls the listeners (so an asyncio session can wake its coroutines)
    and notifies ``cond`` (so threads can wait on it). The non-blocking methods return
    ``WAIT`` when their caller must wait for a change.
    """

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._realtime = config.mode == "realtime"
        # Realtime: one frame per buffer, the newest. Lossless: a window's worth, so the
        # server never waits on the client's preprocessing.
        self._buffer_capacity = 1 if self._realtime else config.max_in_flight
        self._output_capacity = config.max_in_flight + _OUTPUT_SLACK
        self._listeners: list[Callable[[], None]] = []
        self._raw: collections.deque[_Raw] = collections.deque()
        self._ready: collections.deque[_Ready] = collections.deque()
        self._outstanding: collections.OrderedDict[int, _Outstanding] = collections.OrderedDict()
        self._resend: collections.deque[int] = collections.deque()
        self._output: collections.deque[StreamResult] = collections.deque()
        self.generation = 0
        # What frames are prepared for now: the server's answer to GetModelInfo, read again
        # after every break (a restarted server may serve another model). The version tells a
        # frame prepared under an older one.
        self._spec = config.spec
        self._preprocessing_id = config.preprocessing_id
        self._spec_version = 0
        self._stopping = False
        self._closed = False
        self._source_done = False
        self._preprocess_done = False
        self._finished = False
        self._failure: BaseException | None = None
        self._source_failure: BaseException | None = None
        self._next_frame_id = 0
        self._counts = Counters(config.mode)
        # True from a break until a call is answered again: the failed attempts in between
        # belong to the same outage, which counts as one disconnect.
        self._broken = False
        self._intake = Intake(self)
        # Backpressure: the server's rate hint, followed by realtime sessions (follow_hints).
        self._pacer = Pacer(
            enabled=self._realtime and config.follow_hints, max_in_flight=config.max_in_flight
        )

    # -- plumbing

    def is_stopping(self) -> bool:
        """Whether the session is ending: every stage stops taking new work."""
        return self._stopping

    def add_listener(self, listener: Callable[[], None]) -> None:
        with self.lock:
            self._listeners.append(listener)

    def _changed_locked(self) -> None:
        self.cond.notify_all()
        for listener in self._listeners:
            listener()

    def start_threads(self, frames: Iterable[ImageInput]) -> None:
        """Start reading and preprocessing ``frames`` (the session's Intake threads)."""
        self._intake.start(frames)

    def join_threads(self) -> None:
        """Wait for the reader and preprocess threads (after stop()); blocking."""
        self._intake.join()

    def stop(self, *, close: bool = False) -> None:
        """Stop every stage; with close=True the user's iteration ends too."""
        with self.lock:
            self._stopping = True
            self._closed = self._closed or close
            self._changed_locked()

    def fail(self, exc: BaseException) -> None:
        """End the session with ``exc``: results already out are delivered first."""
        with self.lock:
            if self._failure is None and not self._finished:
                self._failure = exc
            self._finished = True
            self._stopping = True
            self._changed_locked()

    # -- the reader thread (intake.Intake)

    def raw_room_locked(self) -> bool:
        """Whether the reader may hand over a frame now (lossless waits for room)."""
        return self._realtime or len(self._raw) < self._buffer_capacity or self.is_stopping()

    def offer_raw_locked(self, index: int, frame: Any, captured: float) -> None:
        """A frame read from the source: skipped at capture, or buffered for preprocessing."""
        self._counts.read += 1
        if self._pacer.skip(captured):
            # Skipped at capture: never prepared nor sent.
            self._counts.skipped += 1
            self._counts.dropped += 1
        else:
            if len(self._raw) >= self._buffer_capacity:
                self._raw.popleft()  # realtime: the latest frame wins
                self._counts.dropped += 1
            self._raw.append(_Raw(index, frame, captured))
        self._changed_locked()

    def source_ended(self, failure: Exception | None) -> None:
        """The source is exhausted, or failed (reported after the frames already read)."""
        with self.lock:
            self._source_failure = failure
            self._source_done = True
            self._changed_locked()

    # -- the preprocess thread (intake.Intake)

    def preprocess_ready_locked(self) -> bool:
        """Whether ``take_raw_locked`` has an answer now (a frame, or the end)."""
        return self.is_stopping() or (
            (bool(self._raw) or self._source_done)
            and (self._realtime or len(self._ready) < self._buffer_capacity)
        )

    def take_raw_locked(self) -> _Job | None:
        """The next frame to prepare, and what for; None when the thread is done."""
        if self.is_stopping() or not self._raw:
            return None
        raw = self._raw.popleft()
        self._changed_locked()
        return _Job(raw, self._spec, self._preprocessing_id, self._spec_version)

    def put_ready_locked(
        self, job: _Job, request: pb.StreamRequest | None, error: FrameError | None
    ) -> bool:
        """A frame prepared (or failed) for sending; False when the session is stopping."""
        if self.is_stopping():
            return False
        raw = job.raw
        if job.spec_version != self._spec_version:
            # The server's preprocessing changed meanwhile: prepare it again (in realtime a
            # newer frame may push it out first, counted as a drop).
            self._raw.appendleft(raw)
            return True
        frame_id = self._next_frame_id
        self._next_frame_id += 1
        if request is not None:
            request.frame_id = frame_id
        if len(self._ready) >= self._buffer_capacity:
            self._ready.popleft()  # realtime: the latest frame wins
            self._counts.dropped += 1
        source = None if self._realtime else raw.frame
        self._ready.append(_Ready(frame_id, raw.index, raw.captured, request, error, source))
        self._changed_locked()
        return True

    def preprocess_ended(self) -> None:
        with self.lock:
            self._preprocess_done = True
            self._changed_locked()

    def adopt_preprocessing(self, spec: PreprocessSpec, preprocessing_id: str) -> bool:
        """Prepare frames as the server (back after a break) says; False if nothing changed.

        Called between two calls, while no request iterator takes frames. Frames prepared for
        the old preprocessing and not yet answered are prepared again from their source frames,
        keeping their ids and order (lossless), or dropped and counted (realtime: the frames
        after them come prepared anew). Blocking: lossless preprocesses up to a window's worth.
        """
        with self.lock:
            if preprocessing_id == self._preprocessing_id:
                return False
            self._spec, self._preprocessing_id = spec, preprocessing_id
            self._spec_version += 1
            if self._realtime:
                self._counts.dropped += len(self._ready)
                self._ready.clear()
                self._changed_locked()
                return True
            stale = [*self._ready, *(self._outstanding[fid].item for fid in self._resend)]
        # Outside the lock: the stale frames stay where they are (nothing takes frames between
        # calls, and the preprocess thread only appends), so they are updated in place.
        prepared = [prepare(self.config, item.source, spec, preprocessing_id) for item in stale]
        with self.lock:
            for item, (request, error) in zip(stale, prepared, strict=True):
                if request is not None:
                    request.frame_id = item.frame_id
                item.request, item.error = request, error
            self._changed_locked()
        return True

    # -- the request iterator of the current call

    def take_locked(self, generation: int) -> pb.StreamRequest | Signal:
        """The next frame to send on call ``generation``, WAIT, or END (half-close)."""
        if self.is_stopping() or generation != self.generation:
            return END
        while self._resend:
            frame_id = self._resend.popleft()
            slot = self._outstanding[frame_id]
            if slot.item.request is None:
                # Its source frame failed to preprocess for the server's new model.
                assert slot.item.error is not None
                slot.sent = False
                self._complete_locked(frame_id, slot.item.error)
                continue
            slot.sent = True
            self._counts.resent += 1
            self._stamp_locked(slot.item)
            self._count_in_flight_locked()
            return slot.item.request
        while (
            self._ready
            and len(self._outstanding) < self._pacer.window
            and len(self._output) < self._output_capacity
        ):
            item = self._ready.popleft()
            self._changed_locked()
            if item.request is None:
                # Never sent: its result is ready now, delivered once the frames before it are.
                assert item.error is not None
                self._outstanding[item.frame_id] = _Outstanding(item, sent=False)
                self._complete_locked(item.frame_id, item.error)
                continue
            self._outstanding[item.frame_id] = _Outstanding(item, sent=True)
            self._counts.sent += 1
            self._stamp_locked(item)
            self._count_in_flight_locked()
            return item.request
        if self._source_done and self._preprocess_done and not self._raw and not self._ready:
            return END
        return WAIT

    def _stamp_locked(self, item: _Ready) -> None:
        """Set the frame's capture-to-send time (its age so far, on this clock) as it leaves."""
        assert item.request is not None
        item.request.capture_age_us = max(0, int((time.monotonic() - item.captured) * 1e6))
        self._counts.bytes_sent += item.request.ByteSize()

    def _count_in_flight_locked(self) -> None:
        self._counts.in_flight += 1
        self._counts.max_in_flight = max(self._counts.max_in_flight, self._counts.in_flight)
        self._changed_locked()

    # -- the response reader of the current call

    def output_room_locked(self) -> bool:
        """Whether the next answer may be read (else results wait for the user)."""
        return self.is_stopping() or len(self._output) < self._output_capacity

    def on_response_locked(self, generation: int, response: pb.StreamResponse) -> None:
        """Record the answer for one frame."""
        if generation != self.generation:
            return  # a late answer on a call already given up; its frames were dealt with
        slot = self._outstanding.get(response.frame_id)
        if slot is None or not slot.sent or slot.result is not None:
            logger.warning(
                "ignoring an answer for frame %d, which is not in flight", response.frame_id
            )
            return
        outcome = frame_outcome(response)
        if response.HasField("hint"):
            self._pacer.on_hint(response.hint)
        age_us = response.age.at_compute_us if response.HasField("age") else 0
        self._counts.in_flight -= 1
        self._complete_locked(response.frame_id, outcome, age_us / 1000 if age_us else None)

    def _complete_locked(
        self, frame_id: int, outcome: Classification | FrameError, age_ms: float | None = None
    ) -> None:
        slot = self._outstanding[frame_id]
        latency_ms = (time.monotonic() - slot.item.captured) * 1000.0
        slot.result = StreamResult(frame_id, slot.item.index, outcome, latency_ms, age_ms)
        self._counts.received += 1
        if isinstance(outcome, FrameError):
            self._counts.errors += 1
        else:
            self._counts.latencies.record(latency_ms)
        self._flush_locked()

    def _flush_locked(self) -> None:
        """Move finished frames to the output, in source order."""
        while self._outstanding:
            frame_id, slot = next(iter(self._outstanding.items()))
            if slot.result is None:
                break
            del self._outstanding[frame_id]
            self._output.append(slot.result)
        self._changed_locked()

    def on_break_locked(self) -> int:
        """The current call failed: give up its frames (realtime) or queue them again."""
        self.generation += 1
        self._pacer.reset()
        if not self._broken:
            self._broken = True
            self._counts.disconnects += 1
        waiting = [fid for fid, slot in self._outstanding.items() if slot.result is None]
        if self._realtime:
            for frame_id in waiting:
                del self._outstanding[frame_id]
            self._counts.dropped += len(waiting)
            self._flush_locked()
        else:
            for frame_id in waiting:
                self._outstanding[frame_id].sent = False
            self._resend = collections.deque(waiting)
        self._changed_locked()
        return len(waiting)

    def on_reconnected_locked(self) -> None:
        self._broken = False
        self._counts.reconnects += 1
        self._changed_locked()

    def drained_locked(self) -> bool:
        """Whether every frame of the source has its result (or was dropped)."""
        return (
            self._source_done
            and self._preprocess_done
            and not self._raw
            and not self._ready
            and not self._resend
            and not self._outstanding
        )

    def finish(self) -> None:
        """The last call ended with every frame answered."""
        with self.lock:
            if self._failure is None:
                self._failure = self._source_failure
            self._finished = True
            self._stopping = True
            self._changed_locked()

    # -- the user's iteration

    def pop_locked(self) -> StreamResult | BaseException | Signal:
        """The next result, the failure that ended the stream (once), WAIT or END."""
        if self._closed:
            return END
        if self._output:
            result = self._output.popleft()
            self._changed_locked()
            return result
        if self._finished:
            failure, self._failure = self._failure, None
            return END if failure is None else failure
        return WAIT

    def stats(self) -> StreamStats:
        """A snapshot of the counters."""
        with self.lock:
            return self._counts.snapshot(self._pacer.rate_hint)
