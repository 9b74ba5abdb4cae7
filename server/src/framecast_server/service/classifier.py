"""The Classifier servicer: translation only, protobuf <-> numpy and exceptions <-> status codes.

Everything else (validation of the wire format aside) happens in the core: the batcher runs the
backend, the prepared model knows its labels and preprocessing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_client._proto import classifier_pb2_grpc as pb_grpc
from framecast_client.preprocess import PreprocessSpec

from ..batcher import ItemResult
from ..runtime import ServingModel
from ..topk import top_k
from .decoding import ImageDecoder
from .errors import ModelNotReadyError, status_for

DEFAULT_TOP_K = 5
# Frames of one stream admitted to the batcher before the servicer stops reading that stream:
# flow control pushes back on the client instead of queueing without bound.
STREAM_WINDOW = 64


# A stream frame between admission and its response: (frame_id, top_k, the batcher's future of
# its result, or the error that refused it). A plain tuple: one is built for every frame.
_AdmittedFrame = tuple[int, int, "asyncio.Future[list[ItemResult]] | Exception"]


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ClassifierServicer(pb_grpc.ClassifierServicer):
    """Serves framecast.v1.Classifier; answers UNAVAILABLE until a model is attached."""

    def __init__(self, *, max_message_bytes: int) -> None:
        self._serving: ServingModel | None = None
        self._model_info: pb.ModelInfo | None = None
        self._preprocessing_id = ""
        self._max_message_bytes = max_message_bytes
        self._decoder = ImageDecoder()

    def attach(self, serving: ServingModel) -> None:
        """Start serving this model (after it has been loaded and warmed up)."""
        self._model_info = self._describe(serving)
        self._preprocessing_id = self._model_info.preprocessing_id
        self._serving = serving

    def _require_serving(self) -> ServingModel:
        if self._serving is None:
            raise ModelNotReadyError
        return self._serving

    def _describe(self, serving: ServingModel) -> pb.ModelInfo:
        # Built once per model: it does not change while the model is served.
        model, preset, backend = serving.model, serving.model.preset, serving.backend.info
        spec = PreprocessSpec(
            input_height=preset.input_size,
            input_width=preset.input_size,
            resize_policy=preset.resize_policy,
            resize_size=preset.resize_size,
            interpolation=preset.interpolation,
        )
        preprocessing = wire.preprocessing_to_proto(spec, normalization=preset.normalization)
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            backend=backend.name,
            precision=backend.precision,
            max_batch=serving.batcher.settings.max_batch,
            preprocessing=preprocessing,
            preprocessing_id=wire.preprocessing_id(preprocessing),
            pretrained=model.pretrained,
            weights_source=model.weights_source,
            warning=model.warning,
            labels=model.labels,
            max_message_bytes=self._max_message_bytes,
            encodings=wire.encodings_to_proto(wire.SERVER_ENCODINGS),
        )

    async def GetModelInfo(
        self,
        request: pb.GetModelInfoRequest,
        context: grpc.aio.ServicerContext[pb.GetModelInfoRequest, pb.ModelInfo],
    ) -> pb.ModelInfo:
        if self._model_info is None:
            await context.abort(*status_for(ModelNotReadyError()))
        return self._model_info

    async def Classify(
        self,
        request: pb.ClassifyRequest,
        context: grpc.aio.ServicerContext[pb.ClassifyRequest, pb.ClassifyResponse],
    ) -> pb.ClassifyResponse:
        try:
            serving = self._require_serving()
            k = self._top_k(request.top_k if request.HasField("top_k") else None, serving)
            wire.check_preprocessing(request.preprocessing_id, self._preprocessing_id)
            size = serving.model.preset.input_size
            batch = await self._decoder.batch(
                request.images,
                height=size,
                width=size,
                max_batch=serving.batcher.settings.max_batch,
            )
            items = await serving.batcher.submit(batch, deadline=_deadline(context))
            response = pb.ClassifyResponse()
            for item in items:
                self._fill_result(response.results.add(), item, k, serving)
            return response
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
        admit = self._frame_admission(serving, _deadline(context))
        # Admitted frames wait here in arrival order, each as the batcher's future of its result
        # (no task per frame); the bound caps how many one stream may have outstanding.
        pending: asyncio.Queue[_AdmittedFrame | None] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read_frames() -> None:
            try:
                async for frame in request_iterator:
                    await pending.put(admit(frame))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read_frames())
        try:
            while (entry := await pending.get()) is not None:
                yield await self._frame_response(entry, serving)
            await reader  # re-raises a failure of the request stream
        finally:
            reader.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if leftover is not None and not isinstance(leftover[2], Exception):
                    leftover[2].cancel()  # withdraws it from the batcher's queue
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    def _frame_admission(
        self, serving: ServingModel, deadline: float | None
    ) -> Callable[[pb.StreamRequest], _AdmittedFrame]:
        """The per-frame admission step of one stream, with the stream's constants bound once."""
        size = serving.model.preset.input_size
        submit = serving.batcher.submit_nowait
        image_from_proto = wire.image_from_proto
        check_preprocessing = wire.check_preprocessing
        served = self._preprocessing_id

        decode = self._decoder.image

        async def decode_then_submit(image: pb.Image) -> list[ItemResult]:
            # Cancelling this task (the stream ended) cancels the batcher's future too.
            array = await decode(image, height=size, width=size)
            return await submit(array[None], deadline=deadline)

        def admit(frame: pb.StreamRequest) -> _AdmittedFrame:
            try:
                k = self._top_k(frame.top_k if frame.HasField("top_k") else None, serving)
                check_preprocessing(frame.preprocessing_id, served)
                if wire.is_encoded(frame.image):
                    # Decoded on the decoder's threads; frames still answer in arrival order.
                    return frame.frame_id, k, asyncio.ensure_future(decode_then_submit(frame.image))
                image = image_from_proto(frame.image, height=size, width=size)
                return frame.frame_id, k, submit(image[None], deadline=deadline)
            except Exception as exc:
                return frame.frame_id, 0, exc

        return admit

    async def _frame_response(
        self, entry: _AdmittedFrame, serving: ServingModel
    ) -> pb.StreamResponse:
        frame_id, k, outcome = entry
        try:
            if isinstance(outcome, Exception):
                raise outcome
            (item,) = await outcome
            response = pb.StreamResponse(frame_id=frame_id)
            self._fill_result(response.classification, item, k, serving)
            return response
        except Exception as exc:
            code, message = status_for(exc)
            return pb.StreamResponse(
                frame_id=frame_id, error=pb.FrameError(code=code.value[0], message=message)
            )

    @staticmethod
    def _top_k(value: int | None, serving: ServingModel) -> int:
        return wire.top_k_from_proto(
            value, num_classes=len(serving.model.labels), default=DEFAULT_TOP_K
        )

    @staticmethod
    def _fill_result(
        message: pb.Classification, item: ItemResult, k: int, serving: ServingModel
    ) -> None:
        indices, probabilities = top_k(item.probabilities, k)
        wire.fill_classification(
            message,
            indices,
            probabilities,
            serving.model.labels,
            queue_us=item.queue_us,
            compute_us=item.compute_us,
            batch_size=item.batch_size,
        )
