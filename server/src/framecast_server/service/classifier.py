"""The Classifier servicer: translation only, protobuf <-> numpy and exceptions <-> status codes.

Everything else (validation of the wire format aside) happens in the core: the batcher runs the
backend, the prepared model knows its labels and preprocessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.preprocess import PreprocessSpec

from ..batcher import ItemResult
from ..runtime import ServingModel
from ..topk import top_k
from .errors import ModelNotReadyError, status_for

DEFAULT_TOP_K = 5
# Frames of one stream admitted to the batcher before the servicer stops reading that stream:
# flow control pushes back on the client instead of queueing without bound.
STREAM_WINDOW = 64


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """Serves framecast.v1.Classifier; answers UNAVAILABLE until a model is attached."""

    def __init__(self, *, max_message_bytes: int) -> None:
        self._serving: ServingModel | None = None
        self._max_message_bytes = max_message_bytes

    def attach(self, serving: ServingModel) -> None:
        """Start serving this model (after it has been loaded and warmed up)."""
        self._serving = serving

    def _require_serving(self) -> ServingModel:
        if self._serving is None:
            raise ModelNotReadyError
        return self._serving

    async def GetModelInfo(
        self,
        request: pb.GetModelInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetModelInfoRequest, pb.ModelInfo],
    ) -> pb.ModelInfo:
        try:
            serving = self._require_serving()
        except ModelNotReadyError as exc:
            await context.abort(*status_for(exc))
        model, preset, backend = serving.model, serving.model.preset, serving.backend.info
        spec = PreprocessSpec(
            input_height=preset.input_size,
            input_width=preset.input_size,
            resize_policy=preset.resize_policy,
            resize_size=preset.resize_size,
            interpolation=preset.interpolation,
        )
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            backend=backend.name,
            precision=backend.precision,
            max_batch=serving.batcher.settings.max_batch,
            preprocessing=wire.preprocessing_to_proto(spec, normalization=preset.name),
            pretrained=model.pretrained,
            weights_source=model.weights_source,
            warning=model.warning,
            labels=model.labels,
            max_message_bytes=self._max_message_bytes,
        )

    async def Classify(
        self,
        request: pb.ClassifyRequest,
        context: grpc.aio.ServicerContext[pb.ClassifyRequest, pb.ClassifyResponse],
    ) -> pb.ClassifyResponse:
        try:
            serving = self._require_serving()
            k = self._top_k(request.top_k if request.HasField("top_k") else None, serving)
            size = serving.model.preset.input_size
            batch = wire.images_from_proto(
                request.images,
                height=size,
                width=size,
                max_batch=serving.batcher.settings.max_batch,
            )
            items = await serving.batcher.submit(batch, deadline=_deadline(context))
            return pb.ClassifyResponse(results=[self._result(item, k, serving) for item in items])
        except Exception as exc:
            await context.abort(*status_for(exc))

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext[pb.StreamRequest, pb.StreamResponse],
    ) -> AsyncIterator[pb.StreamResponse]:
        try:
            serving = self._require_serving()
        except ModelNotReadyError as exc:
            await context.abort(*status_for(exc))
        deadline = _deadline(context)
        # Each admitted frame becomes a task; the queue keeps them in arrival order and bounds
        # how many one stream may have outstanding.
        pending: asyncio.Queue[asyncio.Task[pb.StreamResponse] | None] = asyncio.Queue(
            maxsize=STREAM_WINDOW
        )

        async def read_frames() -> None:
            try:
                async for frame in request_iterator:
                    task = asyncio.ensure_future(self._classify_frame(frame, serving, deadline))
                    await pending.put(task)
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read_frames())
        try:
            while (task := await pending.get()) is not None:
                yield await task
            await reader  # re-raises a failure of the request stream
        finally:
            reader.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if leftover is not None:
                    leftover.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _classify_frame(
        self, frame: pb.StreamRequest, serving: ServingModel, deadline: float | None
    ) -> pb.StreamResponse:
        try:
            k = self._top_k(frame.top_k if frame.HasField("top_k") else None, serving)
            size = serving.model.preset.input_size
            image = wire.image_from_proto(frame.image, height=size, width=size)
            (item,) = await serving.batcher.submit(image[None], deadline=deadline)
            return pb.StreamResponse(
                frame_id=frame.frame_id, classification=self._result(item, k, serving)
            )
        except Exception as exc:
            code, message = status_for(exc)
            return pb.StreamResponse(
                frame_id=frame.frame_id,
                error=pb.FrameError(code=code.value[0], message=message),
            )

    @staticmethod
    def _top_k(value: int | None, serving: ServingModel) -> int:
        return wire.top_k_from_proto(
            value, num_classes=len(serving.model.labels), default=DEFAULT_TOP_K
        )

    @staticmethod
    def _result(item: ItemResult, k: int, serving: ServingModel) -> pb.Classification:
        indices, probabilities = top_k(item.probabilities, k)
        return wire.classification_to_proto(
            indices,
            probabilities,
            serving.model.labels,
            queue_us=item.queue_us,
            compute_us=item.compute_us,
            batch_size=item.batch_size,
        )
