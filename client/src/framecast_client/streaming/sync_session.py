"""The blocking session: a receiver thread carries out the drive loop (``drive``)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from .._proto import classifier_pb2 as pb
from .._proto import classifier_pb2_grpc as pb_grpc
from ..connections import open_channel
from ..preprocess import ImageInput
from .config import StreamConfig
from .drive import Drive, OpenCall, Pause, Step, Stop
from .pipeline import WAIT, StreamCore, result_or_raise
from .results import StreamResult, StreamStats


class StreamSession:
    """A running stream; iterate over it for :class:`StreamResult`, in source order.

    Made by :meth:`Client.stream`; use it as a context manager so that closing it stops the
    source, the threads and the call::

        with client.stream(camera, mode="realtime") as session:
            for result in session:
                print(result.index, result.classification.top.label, session.stats.dropped)

    Iteration ends when the source is exhausted and every frame has its result. It raises
    the error that ended the stream, if any: an RpcError the session does not retry (or
    UnavailableError once ``Backoff.give_up_after_s`` has passed), or the exception of a
    failing source, after the results that were already in.
    """

    def __init__(self, frames: Iterable[ImageInput], config: StreamConfig) -> None:
        """Start streaming ``frames`` (normally called by Client.stream)."""
        self._core = StreamCore(config)
        self._call: Any = None
        self._channel = open_channel(config.target, config.credentials, config.channel_options)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._core.start_threads(frames)
        self._driver = threading.Thread(
            target=self._drive, name="framecast-stream-receiver", daemon=True
        )
        self._driver.start()

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> StreamSession:
        return self

    def __next__(self) -> StreamResult:
        core = self._core
        with core.lock:
            while (item := core.pop_locked()) is WAIT:
                core.cond.wait()
        if (result := result_or_raise(item)) is None:
            raise StopIteration
        return result

    @property
    def stats(self) -> StreamStats:
        """Live counters and latency percentiles."""
        return self._core.stats()

    def close(self) -> None:
        """Stop the source, the threads and the call; results not yet taken are discarded."""
        core = self._core
        core.stop(close=True)
        with core.lock:
            call = self._call
        if call is not None:
            call.cancel()
        self._driver.join()
        core.join_threads()

    def _requests(self, generation: int) -> Iterator[pb.StreamRequest]:
        core = self._core
        while True:
            with core.lock:
                while (item := core.take_locked(generation)) is WAIT:
                    core.cond.wait()
            if not isinstance(item, pb.StreamRequest):
                return
            yield item

    def _drive(self) -> None:
        """The receiver thread: carries out the drive loop's steps until the stream ends."""
        core = self._core
        drive = Drive(core)
        try:
            step = drive.start()
            while not isinstance(step, Stop):
                if isinstance(step, OpenCall):
                    step = self._run_call(drive, step.generation)
                elif isinstance(step, Pause):
                    with core.lock:
                        core.cond.wait_for(core.is_stopping, step.seconds)
                    step = drive.paused()
                else:
                    request = pb.GetModelInfoRequest()
                    outcome: pb.ModelInfo | grpc.RpcError
                    try:
                        outcome = self._stub.GetModelInfo(
                            request, timeout=step.timeout, metadata=step.metadata
                        )
                    except grpc.RpcError as exc:
                        outcome = exc
                    step = drive.info_answered(outcome)
        except Exception as exc:
            drive.crashed(exc)
        finally:
            core.stop()
            self._channel.close()

    def _run_call(self, drive: Drive, generation: int) -> Step:
        """One ClassifyStream call, read to its end; the drive loop's next step."""
        core = self._core
        call: Any = self._stub.ClassifyStream(
            self._requests(generation), metadata=core.config.metadata
        )
        with core.lock:
            # close() cancels the call it finds here; a call made after it looked is
            # cancelled by this check instead.
            self._call = call
            if core.is_stopping():
                call.cancel()
                return Stop()
        try:
            for response in call:
                with core.lock:
                    while not core.output_room_locked():
                        core.cond.wait()
                    if not drive.on_response_locked(generation, response):
                        return Stop()
        except grpc.RpcError as exc:
            return drive.call_ended(exc)
        return drive.call_ended(None)
