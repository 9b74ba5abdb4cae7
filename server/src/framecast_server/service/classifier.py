"""The Classifier servicer: translation only, protobuf <-> numpy and exceptions <-> status codes.

Everything else happens in the core: the batcher runs the backend, admits work within the
queue and the memory budget and serves callers in a fair order; the call gate drains calls on
shutdown; the prepared model knows its labels and preprocessing.

Handlers take the request as raw bytes: Classify reads a request of raw images straight from
them (``wire.read_classify_request``, no parsed copy of each frame) and writes its response's
bytes itself; everything else is parsed with ``wire.decode``, so bytes that are
not a valid message get INVALID_ARGUMENT (a per-frame error on a stream) instead of gRPC's
UNKNOWN and a logged traceback. Failures end a call by setting its status, never by raising
(see ``errors.set_status``), so a failed call leaves no reference cycle behind.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from framecast_client import wire
from framecast_client._proto import classifier_pb2 as pb
from framecast_client.preprocess import PreprocessSpec
from numpy.typing import NDArray

from ..admission import Admission
from ..batcher import ItemResult
from ..drain import CallGate
from ..recorder import NULL_RECORDER, Recorder
from ..runtime import ServingModel
from ..topk import top_k
from .callers import caller_of
from .decoding import read_request
from .errors import ModelNotReadyError, set_status, status_for
from .image_decoding import ImageDecoder
from .streaming import Outcome, Prepared, Status, admitted

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
DEFAULT_TOP_K = 5
# Method names as gRPC (and the metrics' method label) spell them.
CLASSIFY = f"/{SERVICE_NAME}/Classify"
CLASSIFY_STREAM = f"/{SERVICE_NAME}/ClassifyStream"

# A parsed stream frame: (frame_id, top_k, its image [1, H, W, 3], a compressed image still to
# decode, or the status refusing it).
_ParsedFrame = tuple[int, int, "NDArray[np.uint8] | pb.Image | Status"]
_Context = grpc.aio.ServicerContext[Any, Any]


def _deadline(context: _Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ClassifierServicer:
    """Serves framecast.v1.Classifier; answers UNAVAILABLE until a model is attached."""

    def __init__(
        self,
        *,
        max_message_bytes: int,
        max_calls_per_connection: int,
        gate: CallGate,
        admission: Admission,
        recorder: Recorder = NULL_RECORDER,
    ) -> None:
        self._serving: ServingModel | None = None
        self._model_info: pb.ModelInfo | None = None
        self._preprocessing_id = ""
        self._encoder = wire.ClassificationEncoder(())
        self._max_message_bytes = max_message_bytes
        self._max_calls_per_connection = max_calls_per_connection
        self._decoder = ImageDecoder()
        self._gate = gate
        self._admission = admission
        self._answered = recorder.frames_answered

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the three methods, each taking its request as raw bytes."""
        handlers = {
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, response_serializer=pb.ModelInfo.SerializeToString
            ),
            # Classify writes its response's bytes itself (wire.ClassificationEncoder). A unary
            # call on the wire, registered as request-streaming so that the handler runs before
            # the request is read: it waits for admission first (admission.py).
            "Classify": grpc.stream_unary_rpc_method_handler(self.Classify),
            "ClassifyStream": grpc.stream_stream_rpc_method_handler(
                self.ClassifyStream, response_serializer=pb.StreamResponse.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )

    def attach(self, serving: ServingModel) -> None:
        """Start serving this model (after it has been loaded and warmed up)."""
        self._model_info = self._describe(serving)
        self._preprocessing_id = self._model_info.preprocessing_id
        self._encoder = wire.ClassificationEncoder(serving.model.labels)
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
            max_calls_per_connection=self._max_calls_per_connection,
            encodings=wire.encodings_to_proto(wire.SERVER_ENCODINGS),
        )

    async def GetModelInfo(self, raw: bytes, context: _Context) -> pb.ModelInfo | None:
        try:
            self._gate.enter()
        except Exception as exc:
            set_status(context, exc)
            return None
        try:
            wire.decode(pb.GetModelInfoRequest, raw)
            if self._model_info is None:
                raise ModelNotReadyError
            return self._model_info
        except Exception as exc:
            set_status(context, exc)
            return None
        finally:
            self._gate.leave()

    async def Classify(self, requests: AsyncIterator[bytes], context: _Context) -> bytes | None:
        try:
            self._gate.enter()
        except Exception as exc:
            set_status(context, exc)
            return None
        frames = 1  # until the request is read: a refused request counts as one image
        admission = self._admission
        caller = caller_of(context)
        admitted = False
        try:
            serving = self._require_serving()
            # Unread until admitted: what waits is the call's HTTP/2 window, not its images.
            await admission.enter(caller)
            admitted = True
            raw = await read_request(context)
            parsed = self._parse_classify(raw, serving)
            if parsed is None:
                parsed = await self._parse_classify_message(raw, serving)
            batch, k = parsed
            del raw  # the batch is a view of it where it could be; nothing else needs it
            frames = len(batch)
            # The batcher's future itself, awaited here: no coroutine or task per request.
            items = await serving.batcher.submit_nowait(
                batch, deadline=_deadline(context), caller=caller
            )
            response = self._respond(items, k)
            self._answered(CLASSIFY, "OK", len(items))
            return response
        except Exception as exc:
            code = set_status(context, exc)
            self._answered(CLASSIFY, code.name, frames)
            return None
        finally:
            if admitted:
                admission.leave()
            self._gate.leave()

    def _parse_classify(
        self, raw: bytes, serving: ServingModel
    ) -> tuple[NDArray[np.uint8], int] | None:
        """A request of raw images, read from its bytes (no parsed copy); None for others."""
        request = wire.read_classify_request(raw)
        if request is None:
            return None
        k = self._top_k(request.top_k, serving)
        wire.check_preprocessing(request.preprocessing_id, self._preprocessing_id)
        size = serving.model.preset.input_size
        batch = request.batch(height=size, width=size, max_batch=serving.batcher.settings.max_batch)
        return batch, k

    async def _parse_classify_message(
        self, raw: bytes, serving: ServingModel
    ) -> tuple[NDArray[np.uint8], int]:
        # Every other request (compressed images, or bytes to refuse) goes through protobuf's
        # parser, so it means and fails exactly as protobuf says. Its own function, so the
        # parsed message (a copy of every image) is freed on return rather than kept alive
        # while the images wait in the queue. Compressed images are decoded on the decoder's
        # threads, off the event loop.
        request = wire.decode(pb.ClassifyRequest, raw)
        k = self._top_k(request.top_k if request.HasField("top_k") else None, serving)
        wire.check_preprocessing(request.preprocessing_id, self._preprocessing_id)
        size = serving.model.preset.input_size
        batch = await self._decoder.batch(
            request.images,
            height=size,
            width=size,
            max_batch=serving.batcher.settings.max_batch,
        )
        return batch, k

    def _respond(self, items: list[ItemResult], k: int) -> bytes:
        """The ClassifyResponse's bytes, written directly (no message objects per result)."""
        encode = self._encoder.classification
        results = []
        for item in items:
            indices, probabilities = top_k(item.probabilities, k)
            results.append(
                encode(
                    indices,
                    probabilities,
                    queue_us=item.queue_us,
                    compute_us=item.compute_us,
                    batch_size=item.batch_size,
                )
            )
        return self._encoder.response(results)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[bytes], context: _Context
    ) -> AsyncIterator[pb.StreamResponse]:
        try:
            self._gate.enter()
        except Exception as exc:
            set_status(context, exc)
            return
        try:
            try:
                serving = self._require_serving()
            except ModelNotReadyError as exc:
                set_status(context, exc)
                return
            parse = self._frame_parser(serving)
            decode_frame = self._frame_decoder(serving)
            deadline = _deadline(context)

            async def prepare(raw: bytes) -> Prepared[tuple[int, int]]:
                frame_id, k, outcome = parse(raw)
                if isinstance(outcome, pb.Image):
                    # Compressed: decoded on the decoder's threads, off the loop.
                    outcome = await decode_frame(outcome)
                return (frame_id, k), outcome, deadline

            frames = admitted(
                request_iterator,
                prepare,
                batcher=serving.batcher,
                caller=caller_of(context),
                gate=self._gate,
                context=context,
            )
            async with contextlib.aclosing(frames):
                async for entry in frames:
                    yield await self._frame_response(entry, serving)
        finally:
            self._gate.leave()

    def _frame_parser(self, serving: ServingModel) -> Callable[[bytes], _ParsedFrame]:
        """The per-frame parsing step of one stream, with the stream's constants bound once."""
        size = serving.model.preset.input_size
        decode, image_from_proto = wire.decode, wire.image_from_proto
        check_preprocessing = wire.check_preprocessing
        served = self._preprocessing_id
        request_type = pb.StreamRequest

        def parse(raw: bytes) -> _ParsedFrame:
            try:
                frame = decode(request_type, raw)
            except Exception as exc:
                return 0, 0, status_for(exc)  # no frame id can be read: 0
            try:
                k = self._top_k(frame.top_k if frame.HasField("top_k") else None, serving)
                check_preprocessing(frame.preprocessing_id, served)
                if wire.is_encoded(frame.image):
                    return frame.frame_id, k, frame.image
                image = image_from_proto(frame.image, height=size, width=size)
                return frame.frame_id, k, image[None]
            except Exception as exc:
                return frame.frame_id, 0, status_for(exc)

        return parse

    def _frame_decoder(
        self, serving: ServingModel
    ) -> Callable[[pb.Image], Awaitable[NDArray[np.uint8] | Status]]:
        """Decoding of one stream's compressed frames: [1, H, W, 3], or the refusing status."""
        size = serving.model.preset.input_size
        decode = self._decoder.image

        async def decode_frame(image: pb.Image) -> NDArray[np.uint8] | Status:
            try:
                return (await decode(image, height=size, width=size))[None]
            except Exception as exc:
                return status_for(exc)

        return decode_frame

    async def _frame_response(
        self, entry: tuple[tuple[int, int], Outcome], serving: ServingModel
    ) -> pb.StreamResponse:
        (frame_id, k), outcome = entry
        if isinstance(outcome, tuple):
            return self._frame_error(frame_id, outcome)
        try:
            (item,) = await outcome
        except Exception as exc:
            return self._frame_error(frame_id, status_for(exc))
        response = pb.StreamResponse(frame_id=frame_id)
        self._fill_result(response.classification, item, k, serving)
        self._answered(CLASSIFY_STREAM, "OK", 1)
        return response

    def _frame_error(self, frame_id: int, status: Status) -> pb.StreamResponse:
        code, message = status
        self._answered(CLASSIFY_STREAM, code.name, 1)
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
