"""The blocking session: a receiver thread runs the call."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from .._proto import classifier_pb2 as pb
from .._proto import classifier_pb2_grpc as pb_grpc
from ..preprocess import ImageInput
from .config import StreamConfig
from .pipeline import WAIT, StreamCore
from .receiver import MODEL_INFO_TIMEOUT_S, Receiver
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
        options = list(config.channel_options)
        if config.credentials is None:
            self._channel = grpc.insecure_channel(config.target, options=options)
        else:
            self._channel = grpc.secure_channel(config.target, config.credentials, options)
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
        if isinstance(item, StreamResult):
            return item
        if isinstance(item, BaseException):
            raise item
        raise StopIteration

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
        """The receiver thread: one call after another until the stream ends."""
        core = self._core
        receiver = Receiver(core)
        reconnecting = False

        def pause(delay: float) -> None:
            with core.lock:
                core.cond.wait_for(core.is_stopping, delay)

        try:
            while True:
                if reconnecting:
                    try:
                        info = self._stub.GetModelInfo(
                            pb.GetModelInfoRequest(), timeout=MODEL_INFO_TIMEOUT_S
                        )
                    except grpc.RpcError as exc:
                        if (delay := receiver.after_break(exc)) is None:
                            return
                        pause(delay)
                        continue
                    if not receiver.adopt(info):
                        return
                    reconnecting = False
                generation = core.generation
                call: Any = self._stub.ClassifyStream(self._requests(generation))
                with core.lock:
                    # close() cancels the call it finds here; a call made after it looked is
                    # cancelled by this check instead.
                    self._call = call
                    if core.is_stopping():
                        call.cancel()
                        return
                error: grpc.RpcError | None = None
                try:
                    for response in call:
                        with core.lock:
                            while not core.output_room_locked():
                                core.cond.wait()
                            if not receiver.on_response_locked(generation, response):
                                return
                    if receiver.call_complete():
                        return
                except grpc.RpcError as exc:
                    error = exc
                if (delay := receiver.after_break(error)) is None:
                    return
                reconnecting = True  # the server may have been restarted with another model
                pause(delay)
        except Exception as exc:
            receiver.crashed(exc)
        finally:
            core.stop()
            self._channel.close()
