"""The two threads that feed a session: reading the source, and preparing its frames.

The **reader thread** only pulls frames from the source, so a camera is read at its own pace
whatever the server does. The **preprocess thread** decodes, resizes and wraps the next frame
while the previous ones make their round trip. Both hand their frames to the session's
:class:`~framecast_client.streaming.pipeline.StreamCore`, which owns the buffers and decides
what is dropped, skipped or waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from .. import wire
from .._proto import classifier_pb2 as pb
from ..errors import InvalidImageError
from ..preprocess import ImageInput, PreprocessSpec, preprocess
from .config import StreamConfig
from .results import FrameError

if TYPE_CHECKING:
    from .pipeline import StreamCore

logger = logging.getLogger(__name__)

# How long close() waits for a source stuck in next() (a stalled camera) before leaving its
# thread behind (it is a daemon thread, and exits as soon as the source returns).
_SOURCE_JOIN_TIMEOUT_S = 2.0


def prepare(
    config: StreamConfig, frame: Any, spec: PreprocessSpec, preprocessing_id: str
) -> tuple[pb.StreamRequest | None, FrameError | None]:
    """The request for one frame, or (when it cannot be preprocessed) its FrameError."""
    try:
        image = preprocess(frame, spec, channel_order=config.channel_order)
    except (InvalidImageError, TypeError) as exc:
        logger.debug("a frame cannot be preprocessed: %s", exc)
        return None, FrameError(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "client")
    request = pb.StreamRequest(
        image=wire.image_to_proto(image, config.encoding),
        top_k=config.top_k,
        preprocessing_id=preprocessing_id,
    )
    return request, None


class Intake:
    """The reader and preprocess threads of one session."""

    def __init__(self, core: StreamCore) -> None:
        self._core = core
        self._threads: list[threading.Thread] = []

    def start(self, frames: Iterable[ImageInput]) -> None:
        """Start reading and preprocessing ``frames``."""
        reader = threading.Thread(
            target=self._read_source, args=(frames,), name="framecast-stream-reader", daemon=True
        )
        worker = threading.Thread(
            target=self._preprocess_frames, name="framecast-stream-preprocess", daemon=True
        )
        self._threads = [reader, worker]
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        """Wait for both threads (after the core stopped); blocking."""
        reader, worker = self._threads or (None, None)
        if worker is not None:
            worker.join()
        if reader is not None:
            reader.join(_SOURCE_JOIN_TIMEOUT_S)
            if reader.is_alive():
                logger.warning(
                    "the frame source did not return within %.0f s of closing the stream; "
                    "its reader thread will exit when it does",
                    _SOURCE_JOIN_TIMEOUT_S,
                )

    def _read_source(self, frames: Iterable[ImageInput]) -> None:
        core = self._core
        iterator: Iterator[ImageInput] | None = None
        failure: Exception | None = None
        try:
            iterator = iter(frames)
            index = 0
            while not core.is_stopping():
                try:
                    frame = next(iterator)
                except StopIteration:
                    break
                captured = time.monotonic()
                with core.lock:
                    while not core.raw_room_locked():
                        core.cond.wait()
                    if core.is_stopping():
                        break
                    core.offer_raw_locked(index, frame, captured)
                index += 1
        except Exception as exc:
            # Frames already read still get their results; the error ends the iteration.
            logger.error("the frame source failed: %r", exc)
            failure = exc
        finally:
            close = getattr(iterator, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:
                    logger.warning("closing the frame source failed: %r", exc)
            core.source_ended(failure)

    def _preprocess_frames(self) -> None:
        core = self._core
        try:
            while True:
                with core.lock:
                    while not core.preprocess_ready_locked():
                        core.cond.wait()
                    job = core.take_raw_locked()
                if job is None:
                    return
                request, error = prepare(core.config, job.raw.frame, job.spec, job.preprocessing_id)
                with core.lock:
                    if not core.put_ready_locked(job, request, error):
                        return
        except Exception as exc:
            logger.exception("preprocessing failed unexpectedly")
            core.fail(exc)
        finally:
            core.preprocess_ended()
