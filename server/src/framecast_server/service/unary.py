"""The unary pipeline, shared by every protocol's unary inference call (Classify, ModelInfer).

One driver decides how a unary call meets the core, so both protocols behave alike, as their
streams do through :func:`.streaming.admitted`:

1. the model serving the call and its deadline (:func:`ready`; UNAVAILABLE while loading);
2. admission (:class:`~framecast_server.core.admission.Admission`): the call waits its turn
   per caller *before* its request is read, so what waits is its HTTP/2 window, not its
   images; this is why these calls are registered request-streaming;
3. the request read by the protocol's codec into images and what its answer needs (compressed
   images decoded on the decoder's threads, off the event loop);
4. the batcher: the images are submitted and the batcher's future awaited (no task per call);
5. the response written by the codec; a failure becomes a status through :mod:`.errors`, and
   the images answered are counted per status for the metrics.

The call gate and the error mapping of whatever escapes are :func:`.handlers.guard`'s, as for
every call. A codec supplies ``read`` (bytes -> its tag, its images, its deadline) and
``write`` (results -> the response message); it only translates.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import grpc
import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.wire_format import WireFormatError
from numpy.typing import NDArray

from ..core.admission import Admission
from ..core.batcher import ItemResult
from ..core.recorder import Recorder
from ..core.runtime import ServingModel
from .callers import caller_of
from .errors import ModelNotReadyError, set_status
from .handlers import Handler
from .image_decoding import ImageDecoder

__all__ = ["Read", "UnaryCodec", "UnaryDriver", "ready"]

_Context = grpc.aio.ServicerContext[Any, Any]
Tag = TypeVar("Tag")
# What a codec read from one request: its tag (what its response needs), its images
# ([N, H, W, 3], or compressed images the driver decodes off the loop) and its deadline.
Read = tuple[Tag, NDArray[np.uint8] | Sequence[pb.Image], float | None]
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # absent from grpc-stubs


def ready(serving: ServingModel | None, context: _Context) -> tuple[ServingModel, float | None]:
    """The model serving a call and the call's deadline (``time.monotonic()``, None: none).

    Raises ModelNotReadyError (UNAVAILABLE) until a model is attached. Every inference call,
    unary or stream, begins here; a stream's deadline is fixed when it opens.
    """
    if serving is None:
        raise ModelNotReadyError
    remaining = context.time_remaining()
    return serving, None if remaining is None else time.monotonic() + remaining


class UnaryCodec(Protocol[Tag]):
    """One protocol's unary call: how its request is read and its response written."""

    method: str  # as gRPC and the metrics spell it
    response_serializer: Callable[..., bytes]

    def read(self, raw: bytes, serving: ServingModel, deadline: float | None) -> Read[Tag]:
        """The request's tag, images and deadline; raises on a request to refuse."""
        ...

    def write(self, items: list[ItemResult], tag: Tag, serving: ServingModel) -> Any:
        """The response for the request's results, in input order."""
        ...


class UnaryDriver(Generic[Tag]):
    """Runs one protocol's unary call through the steps in the module docstring."""

    def __init__(
        self,
        codec: UnaryCodec[Tag],
        *,
        serving: Callable[[], ServingModel | None],
        admission: Admission,
        recorder: Recorder,
    ) -> None:
        self._codec = codec
        self._serving = serving
        self._admission = admission
        self._answered = recorder.frames_answered
        self._decoder = ImageDecoder()

    def handler(self) -> Handler:
        """The call's gRPC handler, taking raw bytes (wrap it in handlers.guard)."""
        made: Handler = grpc.stream_unary_rpc_method_handler(
            self.serve, response_serializer=self._codec.response_serializer
        )
        return made

    async def serve(self, requests: AsyncIterator[bytes], context: _Context) -> Any:
        """One call; None (grpc then sends no message) once a failure has set its status."""
        codec, admission = self._codec, self._admission
        frames = 1  # until the request is read: a refused request counts as one image
        admitted = False
        try:
            serving, deadline = ready(self._serving(), context)
            caller = caller_of(context)
            await admission.enter(caller)
            admitted = True
            # The one request of a call registered as request-streaming (to admit it unread),
            # read here rather than in a helper coroutine: one coroutine less per call.
            raw = await context.read()
            if raw is _EOF:
                raise WireFormatError("the call ended without a request")
            tag, images, deadline = codec.read(raw, serving, deadline)
            del raw  # the images are a view of it where they could be; nothing else needs it
            if not isinstance(images, np.ndarray):
                size = serving.model.preset.input_size
                images = await self._decoder.batch(
                    images, height=size, width=size, max_batch=serving.batcher.settings.max_batch
                )
            frames = len(images)
            # The batcher's future itself, awaited here: no coroutine or task per request.
            items = await serving.batcher.submit_nowait(images, deadline=deadline, caller=caller)
            response = codec.write(items, tag, serving)
            self._answered(codec.method, "OK", len(items))
            return response
        except Exception as exc:
            self._answered(codec.method, set_status(context, exc).name, frames)
            return None
        finally:
            if admitted:
                admission.leave(caller)
