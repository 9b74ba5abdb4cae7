"""The Classifier servicer: translation only, protobuf <-> numpy and exceptions <-> status codes.

Everything else happens in the core: the batcher runs the backend, admits work within the
queue and the memory budget and serves callers in a fair order; the call gate drains calls on
shutdown; the prepared model knows its labels and preprocessing. Classify is
:class:`ClassifyCodec` over the unary driver (unary.py), ClassifyStream a ``prepare`` and a
response over the streams' admission (streaming.py), as the Open Inference Protocol's calls.

Handlers take the request as raw bytes: Classify reads a request of raw images straight from
them (``requests.read_classify_request``, no parsed copy of each frame); everything else is
parsed with ``requests.decode``, so bytes that are not a valid message get INVALID_ARGUMENT (a
per-frame error on a stream) instead of gRPC's UNKNOWN and a logged traceback. Every handler
is registered through ``handlers.guard``: the call gate, and failures ending a call by setting
its status, never by raising, so a failed call leaves no reference cycle behind.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np
from framecast_client._proto import classifier_pb2 as pb
from numpy.typing import NDArray

from ..core.admission import Admission
from ..core.batcher import DeadlineExpiredError, ItemResult
from ..core.drain import CallGate
from ..core.recorder import NULL_RECORDER, Recorder
from ..core.runtime import ServingModel
from ..core.topk import top_k
from .callers import caller_of
from .codecs import requests, results
from .errors import ModelNotReadyError, status_for
from .handlers import guard
from .image_decoding import ImageDecoder
from .stream_board import StreamBoard
from .stream_registry import StreamEntry, StreamRegistry, printable, stream_options
from .streaming import Outcome, Prepared, Status, admitted
from .unary import Read, UnaryDriver, ready

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Classifier"].full_name
DEFAULT_TOP_K = 5
# Method names as gRPC (and the metrics' method label) spell them.
CLASSIFY = f"/{SERVICE_NAME}/Classify"
CLASSIFY_STREAM = f"/{SERVICE_NAME}/ClassifyStream"
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name
# DropReason values by the name metrics count them under.
DROP_REASONS = {
    pb.DROP_REASON_STALE_AT_ADMISSION: "stale_at_admission",
    pb.DROP_REASON_STALE_AT_COMPUTE: "stale_at_compute",
}

# A parsed stream frame: (frame_id, top_k, capture_age_us, its image [1, H, W, 3], a compressed
# image still to decode, or the status refusing it).
_ParsedFrame = tuple[int, int, int, "NDArray[np.uint8] | pb.Image | Status"]


class _Frame:
    """What a stream frame's answer needs: its id, top-k and the times that make its age.

    A frame's age is the client's capture-to-send time (its field capture_age_us, measured on
    the client's clock) plus the server's receive-to-now time (on the server's clock): two
    durations, so the clocks never need to agree. The network transit is not counted; on the
    LAN links cameras use it is well under a millisecond, and estimating it from round trips
    would need a ping per stream for little gain.
    """

    __slots__ = ("admitted_ns", "age_bound", "capture_age_us", "frame_id", "k", "received_ns")

    def __init__(self, frame_id: int, k: int, capture_age_us: int, received_ns: int) -> None:
        self.frame_id = frame_id
        self.k = k
        self.capture_age_us = capture_age_us
        self.received_ns = received_ns
        self.admitted_ns = 0  # 0: not admitted (refused, or dropped on arrival)
        # True when the frame's deadline is its max age rather than the call's deadline.
        self.age_bound = False

    def age_us(self, at_ns: int) -> int:
        return self.capture_age_us + max(0, at_ns - self.received_ns) // 1000


_Context = grpc.aio.ServicerContext[Any, Any]


def _top_k(value: int | None, serving: ServingModel) -> int:
    return requests.top_k_from_proto(
        value, num_classes=len(serving.model.labels), default=DEFAULT_TOP_K
    )


def _fill_result(
    message: pb.Classification, item: ItemResult, k: int, serving: ServingModel
) -> None:
    indices, probabilities = top_k(item.probabilities, k)
    results.fill_classification(
        message,
        indices,
        probabilities,
        serving.model.labels,
        queue_us=item.queue_us,
        compute_us=item.compute_us,
        batch_size=item.batch_size,
    )


class ClassifyCodec:
    """Classify's request and response, for the unary driver; the tag is the request's top-k.

    A request of raw images is read from its bytes (no parsed copy); any other goes through
    protobuf's parser, so it means and fails exactly as protobuf says, and its compressed
    images are left to the driver to decode off the event loop.
    """

    method = CLASSIFY

    def __init__(self) -> None:
        self.response_serializer = pb.ClassifyResponse.SerializeToString
        self.preprocessing_id = ""  # the served model's (ClassifierServicer.attach)

    def read(self, raw: bytes, serving: ServingModel, deadline: float | None) -> Read[int]:
        request = requests.read_classify_request(raw)
        if request is None:
            return self._read_message(raw, serving, deadline)
        k = _top_k(request.top_k, serving)
        requests.check_preprocessing(request.preprocessing_id, self.preprocessing_id)
        size = serving.model.preset.input_size
        batch = request.batch(height=size, width=size, max_batch=serving.batcher.settings.max_batch)
        return k, batch, deadline

    def _read_message(self, raw: bytes, serving: ServingModel, deadline: float | None) -> Read[int]:
        request = requests.decode(pb.ClassifyRequest, raw)
        k = _top_k(request.top_k if request.HasField("top_k") else None, serving)
        requests.check_preprocessing(request.preprocessing_id, self.preprocessing_id)
        images: Sequence[pb.Image] = request.images
        if any(requests.is_encoded(image) for image in images):
            return k, images, deadline  # decoded by the driver, off the loop
        size = serving.model.preset.input_size
        max_batch = serving.batcher.settings.max_batch
        batch = requests.images_from_proto(images, height=size, width=size, max_batch=max_batch)
        return k, batch, deadline

    @staticmethod
    def write(items: list[ItemResult], k: int, serving: ServingModel) -> pb.ClassifyResponse:
        """The ClassifyResponse, its results filled in place as a stream's are."""
        response = pb.ClassifyResponse()
        add = response.results.add
        for item in items:
            _fill_result(add(), item, k, serving)
        return response


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
        self._max_message_bytes = max_message_bytes
        self._max_calls_per_connection = max_calls_per_connection
        self._decoder = ImageDecoder()
        self._gate = gate
        self._answered = recorder.frames_answered
        self._recorder = recorder
        self._classify = ClassifyCodec()
        self._unary = UnaryDriver(
            self._classify, serving=lambda: self._serving, admission=admission, recorder=recorder
        )
        self.streams = StreamRegistry()
        self.board = StreamBoard(self.streams)  # what ListStreams answers (every worker's)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the Classifier's methods and the Admin's, each taking raw bytes."""
        gate = self._gate
        handlers = {
            "GetModelInfo": guard(
                grpc.unary_unary_rpc_method_handler(
                    self.GetModelInfo, response_serializer=pb.ModelInfo.SerializeToString
                ),
                gate,
            ),
            # A unary call on the wire, registered as request-streaming so that the handler
            # runs before the request is read: it waits for admission first (unary.py).
            "Classify": guard(self._unary.handler(), gate),
            "ClassifyStream": guard(
                grpc.stream_stream_rpc_method_handler(
                    self.ClassifyStream, response_serializer=pb.StreamResponse.SerializeToString
                ),
                gate,
            ),
        }
        # The Admin service lists this servicer's streams; the interceptors guard it alike. It
        # answers throughout a drain: no gate.
        admin = {
            "ListStreams": guard(
                grpc.unary_unary_rpc_method_handler(
                    self.ListStreams, response_serializer=pb.ListStreamsResponse.SerializeToString
                ),
                None,
            ),
        }
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),
                grpc.method_handlers_generic_handler(ADMIN_SERVICE_NAME, admin),
            )
        )

    def attach(self, serving: ServingModel) -> None:
        """Start serving this model (after it has been loaded and warmed up)."""
        self._model_info = self._describe(serving)
        self._classify.preprocessing_id = self._model_info.preprocessing_id
        self.streams.set_concurrency(serving.backend.max_concurrent_batches)
        self._serving = serving

    def _describe(self, serving: ServingModel) -> pb.ModelInfo:
        # Built once per model: it does not change while the model is served.
        model, preset, backend = serving.model, serving.model.preset, serving.backend.info
        preprocessing = results.preprocessing_to_proto(preset)
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            backend=backend.name,
            precision=backend.precision,
            max_batch=serving.batcher.settings.max_batch,
            preprocessing=preprocessing,
            preprocessing_id=results.preprocessing_id(preprocessing),
            pretrained=model.pretrained,
            weights_source=model.weights_source,
            warning=model.warning,
            labels=model.labels,
            max_message_bytes=self._max_message_bytes,
            max_calls_per_connection=self._max_calls_per_connection,
            encodings=results.encodings_to_proto(requests.SERVER_ENCODINGS),
        )

    async def GetModelInfo(self, raw: bytes, context: _Context) -> pb.ModelInfo:
        requests.decode(pb.GetModelInfoRequest, raw)
        if self._model_info is None:
            raise ModelNotReadyError
        return self._model_info

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[bytes], context: _Context
    ) -> None:
        # Writes its answers itself (context.write) rather than yielding them: handlers.guard
        # then wraps it without a generator layer of its own per frame.
        serving, deadline = ready(self._serving, context)
        name, max_age_ms = stream_options(context.invocation_metadata() or ())
        parse = self._frame_parser(serving)
        decode_frame = self._frame_decoder(serving)
        caller = caller_of(context)
        stream = self.streams.open(printable(str(caller)), name, max_age_ms)
        max_age_us = max_age_ms * 1000

        async def prepare(raw: bytes) -> Prepared[_Frame]:
            received = time.monotonic_ns()
            stream.received()
            frame_id, k, capture_age_us, outcome = parse(raw)
            if isinstance(outcome, pb.Image):
                # Compressed: decoded on the decoder's threads, off the loop.
                outcome = await decode_frame(outcome)
            frame = _Frame(frame_id, k, capture_age_us, received)
            frame_deadline = deadline
            if max_age_us and isinstance(outcome, np.ndarray):
                now = time.monotonic_ns()
                # The frame's age reaches max_age at this deadline: the batcher drops it
                # then if it has not started computing (or on admission, if already past).
                age_deadline = now / 1e9 + (max_age_us - frame.age_us(now)) / 1e6
                if frame_deadline is None or age_deadline < frame_deadline:
                    frame_deadline = age_deadline
                    frame.age_bound = True
            return frame, outcome, frame_deadline

        def on_admit(frame: _Frame) -> None:
            frame.admitted_ns = time.monotonic_ns()

        frames = admitted(
            request_iterator,
            prepare,
            batcher=serving.batcher,
            caller=caller,
            gate=self._gate,
            context=context,
            on_admit=on_admit,
        )
        try:
            async with contextlib.aclosing(frames):
                async for entry in frames:
                    await context.write(await self._frame_response(entry, serving, stream))
        finally:
            self.streams.close(stream)

    async def ListStreams(self, raw: bytes, context: _Context) -> pb.ListStreamsResponse:
        """The open streams (ClassifyStream), oldest first, of every worker (stream_board.py)."""
        requests.decode(pb.ListStreamsRequest, raw)
        return await self.board.listing()

    def _frame_parser(self, serving: ServingModel) -> Callable[[bytes], _ParsedFrame]:
        """The per-frame parsing step of one stream, with the stream's constants bound once."""
        size = serving.model.preset.input_size
        decode, image_from_proto = requests.decode, requests.image_from_proto
        check_preprocessing = requests.check_preprocessing
        served = self._classify.preprocessing_id
        request_type = pb.StreamRequest

        def parse(raw: bytes) -> _ParsedFrame:
            try:
                frame = decode(request_type, raw)
            except Exception as exc:
                return 0, 0, 0, status_for(exc)  # no frame id can be read: 0
            age = frame.capture_age_us
            try:
                k = _top_k(frame.top_k if frame.HasField("top_k") else None, serving)
                check_preprocessing(frame.preprocessing_id, served)
                if requests.is_encoded(frame.image):
                    return frame.frame_id, k, age, frame.image
                image = image_from_proto(frame.image, height=size, width=size)
                return frame.frame_id, k, age, image[None]
            except Exception as exc:
                return frame.frame_id, 0, age, status_for(exc)

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
        self, entry: tuple[_Frame, Outcome], serving: ServingModel, stream: StreamEntry
    ) -> pb.StreamResponse:
        frame, outcome = entry
        if isinstance(outcome, tuple):
            if frame.age_bound and outcome[0] is grpc.StatusCode.DEADLINE_EXCEEDED:
                # Its max age passed before it could be admitted (on arrival, or while the
                # stream waited for room in the queue).
                return self._stale(frame, stream, pb.DROP_REASON_STALE_AT_ADMISSION)
            return self._frame_error(frame, stream, outcome)
        try:
            (item,) = await outcome
        except DeadlineExpiredError as exc:
            if frame.age_bound:
                return self._stale(frame, stream, pb.DROP_REASON_STALE_AT_COMPUTE)
            return self._frame_error(frame, stream, status_for(exc))
        except Exception as exc:
            return self._frame_error(frame, stream, status_for(exc))
        response = pb.StreamResponse(frame_id=frame.frame_id)
        _fill_result(response.classification, item, frame.k, serving)
        at_admission = frame.age_us(frame.admitted_ns)
        at_compute = at_admission + item.queue_us
        response.age.at_admission_us = at_admission
        response.age.at_compute_us = at_compute
        self._recorder.frame_age(at_admission, at_compute)
        self.streams.capacity.computed(item.compute_us, item.batch_size)
        self._hint(response, stream)
        stream.answered((time.monotonic_ns() - frame.received_ns) / 1e6, at_compute / 1000, ok=True)
        self._answered(CLASSIFY_STREAM, "OK", 1)
        return response

    def _stale(
        self, frame: _Frame, stream: StreamEntry, reason: pb.DropReason.ValueType
    ) -> pb.StreamResponse:
        now = time.monotonic_ns()
        age_us = frame.age_us(now)
        where = "on arrival" if reason == pb.DROP_REASON_STALE_AT_ADMISSION else "while queued"
        message = (
            f"dropped {where}: the frame was {age_us / 1000:.0f} ms old, over the stream's "
            f"max age of {stream.max_age_ms} ms"
        )
        self._recorder.frames_dropped(DROP_REASONS[reason], 1)
        response = self._frame_error(
            frame, stream, (grpc.StatusCode.DEADLINE_EXCEEDED, message), reason
        )
        response.age.at_admission_us = (
            age_us if frame.admitted_ns == 0 else frame.age_us(frame.admitted_ns)
        )
        self._recorder.frame_age(response.age.at_admission_us, None)
        return response

    def _frame_error(
        self,
        frame: _Frame,
        stream: StreamEntry,
        status: Status,
        reason: pb.DropReason.ValueType = pb.DROP_REASON_UNSPECIFIED,
    ) -> pb.StreamResponse:
        code, message = status
        self._answered(CLASSIFY_STREAM, code.name, 1)
        response = pb.StreamResponse(
            frame_id=frame.frame_id,
            error=pb.FrameError(code=code.value[0], message=message, drop_reason=reason),
        )
        self._hint(response, stream)
        stream.answered((time.monotonic_ns() - frame.received_ns) / 1e6, None, ok=False)
        return response

    def _hint(self, response: pb.StreamResponse, stream: StreamEntry) -> None:
        """Tell the stream the rate it gets now (FlowHint), once the capacity is measured."""
        rate, window = self.streams.hint(stream.max_age_ms)
        if rate > 0:
            response.hint.rate_fps = rate
            response.hint.max_in_flight = window
            stream.rate_hint_fps = rate
