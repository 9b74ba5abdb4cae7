"""The Open Inference Protocol servicer (KServe v2 gRPC, Triton's extensions): translation only.

``inference.GRPCInferenceService`` on the same port as ``framecast.v1.Classifier``, through the
same batcher and the same exception -> status mapping, so Triton's clients, perf_analyzer and
KServe tooling talk to Framecast. ModelInfer is :class:`ModelInferCodec` over the unary driver
(unary.py), ModelStreamInfer the same reading over the streams' admission (streaming.py), as
Framecast's own calls; tensors are read and written by :mod:`.codecs.tensors`. This module
maps requests to those and describes the model in the protocol's terms.

The model is served as ``resnet50`` (the architecture, a stable name for tools and configs);
its version is the prepared model's version, which changes whenever the served graph does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from importlib import metadata
from typing import Any, TypeVar

import grpc
import numpy as np
from framecast_client.wire_format import WireFormatError
from framecast_oip._proto import open_inference_pb2 as pb
from framecast_oip._proto import open_inference_pb2_grpc as pb_grpc
from numpy.typing import NDArray

from ..core.admission import Admission
from ..core.batcher import ItemResult
from ..core.drain import CallGate
from ..core.recorder import NULL_RECORDER, Recorder
from ..core.runtime import ServingModel
from ..core.topk import top_k
from .callers import caller_of
from .codecs import requests
from .codecs import tensors as oip
from .errors import ModelNotFoundError, ModelNotReadyError, status_for
from .handlers import guarded
from .streaming import Prepared, admitted
from .unary import Read, UnaryDriver, ready

MODEL_NAME = "resnet50"
SERVER_NAME = "framecast"
# Triton's names for the extensions served here ("classification" is the one clients check).
EXTENSIONS = ("classification", "model_configuration", "statistics")
TIMEOUT_PARAMETER = "timeout"  # Triton's request parameter: microseconds the server may take

# What a stream request's response needs: its id, model name and version, and its requested
# outputs. Not the request itself: its 150 KB would stay alive beside the image the batcher
# holds. A plain tuple: one is built per request.
_Tag = tuple[str, str, str, list[oip.RequestedOutput]]
_T = TypeVar("_T")


def _server_version() -> str:
    try:
        return metadata.version("framecast-server")
    except metadata.PackageNotFoundError:
        return "unknown"


# Method names as gRPC (and the metrics' method label) spell them.
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MODEL_INFER = f"/{_SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{_SERVICE}/ModelStreamInfer"


# ---------------------------------------------------------------- reading and writing inference
def _check_name(name: str) -> None:
    if name != MODEL_NAME:
        raise ModelNotFoundError(
            f"unknown model {name!r}: this server serves one model, {MODEL_NAME!r}"
        )


def _check_version(version: str, serving: ServingModel) -> None:
    if version not in ("", serving.model.version):
        raise ModelNotFoundError(
            f"model {MODEL_NAME!r} has no version {version!r}; this server serves version "
            f"{serving.model.version!r} (or leave the version empty)"
        )


def _read(
    request: pb.ModelInferRequest, serving: ServingModel, call_deadline: float | None
) -> tuple[list[oip.RequestedOutput], NDArray[np.uint8], float | None]:
    """Validate a request: its model, outputs, images and deadline; raises on bad input."""
    _check_name(request.model_name)
    _check_version(request.model_version, serving)
    outputs = oip.requested_outputs(request, num_classes=len(serving.model.labels))
    size = serving.model.preset.input_size
    batch = oip.images_from_request(
        request, height=size, width=size, max_batch=serving.batcher.settings.max_batch
    )
    return outputs, batch, _deadline(request, call_deadline)


def _deadline(request: pb.ModelInferRequest, call_deadline: float | None) -> float | None:
    """The earlier of the call's deadline and the request's ``timeout`` parameter (us)."""
    parameters = request.parameters
    if TIMEOUT_PARAMETER not in parameters:
        return call_deadline
    parameter = parameters[TIMEOUT_PARAMETER]
    if parameter.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
        raise WireFormatError("the timeout parameter must be an integer (microseconds)")
    timeout_us = parameter.int64_param or parameter.uint64_param
    if timeout_us <= 0:
        return call_deadline
    own = time.monotonic() + timeout_us / 1e6
    return own if call_deadline is None else min(call_deadline, own)


def _fill_response(
    response: pb.ModelInferResponse,
    serving: ServingModel,
    request_id: str,
    outputs: Sequence[oip.RequestedOutput],
    items: Sequence[ItemResult],
) -> None:
    """Fill ``response`` in place (inside a stream response: no copy of a finished one)."""
    response.model_name = MODEL_NAME
    response.model_version = serving.model.version
    response.id = request_id
    probabilities: NDArray[np.float32] = (
        items[0].probabilities[None]
        if len(items) == 1
        else np.stack([item.probabilities for item in items])
    )
    labels = serving.model.labels
    for output in outputs:
        k = output.class_count
        if k is None:
            oip.add_probabilities(response, output.name, probabilities)
            continue
        rows = []
        for row in probabilities:
            indices, values = top_k(row, k)
            rows.append(
                [
                    oip.classification_element(p, i, labels[i])
                    for i, p in zip(indices, values, strict=True)
                ]
            )
        oip.add_classes(response, output.name, rows)


# What a ModelInfer response needs of its request: its id and its requested outputs.
_InferTag = tuple[str, list[oip.RequestedOutput]]


class ModelInferCodec:
    """ModelInfer's request and response, for the unary driver (unary.py)."""

    method = MODEL_INFER

    def __init__(self) -> None:
        self.response_serializer = pb.ModelInferResponse.SerializeToString

    @staticmethod
    def read(raw: bytes, serving: ServingModel, deadline: float | None) -> Read[_InferTag]:
        request = requests.decode(pb.ModelInferRequest, raw)
        outputs, batch, deadline = _read(request, serving, deadline)
        return (request.id, outputs), batch, deadline

    @staticmethod
    def write(items: list[ItemResult], tag: _InferTag, serving: ServingModel) -> Any:
        response = pb.ModelInferResponse()
        _fill_response(response, serving, tag[0], tag[1], items)
        return response


# ---------------------------------------------------------------- what the model is
def _platform(serving: ServingModel) -> str:
    return f"framecast_{serving.backend.info.name}"


def _describe(serving: ServingModel) -> pb.ModelMetadataResponse:
    model, preset = serving.model, serving.model.preset
    size = preset.input_size
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=MODEL_NAME,
        versions=[model.version],
        platform=_platform(serving),
        inputs=[tensor(name=oip.INPUT_NAME, datatype="UINT8", shape=[-1, size, size, 3])],
        outputs=[tensor(name=oip.OUTPUT_NAME, datatype="FP32", shape=[-1, len(model.labels)])],
        properties={
            # What a client does to a picture before sending it; the server normalizes.
            "input_layout": "NHWC, RGB, uint8 0-255",
            "resize_policy": preset.resize_policy,
            "resize_size": str(preset.resize_size),
            "interpolation": preset.interpolation,
            "crop_size": str(size),
            "normalization": f"{preset.normalization} (applied by the server)",
            "framecast_model": model.name,
            "pretrained": str(model.pretrained).lower(),
            "warning": model.warning,
        },
    )


def _configure(serving: ServingModel) -> pb.ModelConfigResponse:
    settings = serving.batcher.settings
    size = serving.model.preset.input_size
    return pb.ModelConfigResponse(
        config=pb.ModelConfig(
            name=MODEL_NAME,
            platform=_platform(serving),
            backend=serving.backend.info.name,
            max_batch_size=settings.max_batch,
            input=[
                pb.ModelInput(
                    name=oip.INPUT_NAME,
                    data_type=pb.TYPE_UINT8,
                    format=pb.ModelInput.FORMAT_NHWC,
                    dims=[size, size, 3],
                )
            ],
            output=[
                pb.ModelOutput(
                    name=oip.OUTPUT_NAME,
                    data_type=pb.TYPE_FP32,
                    dims=[len(serving.model.labels)],
                )
            ],
            dynamic_batching=pb.ModelDynamicBatching(
                max_queue_delay_microseconds=settings.max_delay_us, preserve_ordering=True
            ),
        )
    )


def _statistics(serving: ServingModel) -> pb.ModelStatistics:
    """The batcher's counters in Triton's terms; counts are images, as Triton counts them.

    Framecast times a batch as one backend call (input copy and output copy included), so
    compute_input and compute_output carry counts and no time.
    """
    stats = serving.batcher.model_stats
    images = stats.images_run
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=MODEL_NAME,
        version=serving.model.version,
        last_inference=stats.last_run_unix_ns // 1_000_000,
        inference_count=images,
        execution_count=stats.batches_run,
        inference_stats=pb.InferStatistics(
            success=duration(count=images, ns=stats.queue_ns + stats.compute_ns),
            fail=duration(count=stats.failed_images + stats.dropped_expired + stats.rejected_full),
            queue=duration(count=images, ns=stats.queue_ns),
            compute_input=duration(count=images),
            compute_infer=duration(count=images, ns=stats.compute_ns),
            compute_output=duration(count=images),
        ),
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves inference.GRPCInferenceService; not ready (UNAVAILABLE) until a model is attached.

    Every call is registered through ``handlers.guarded`` (the call gate, the error mapping,
    malformed bytes), so a handler here raises what is wrong and the guard sets the status.
    """

    def __init__(
        self, *, gate: CallGate, admission: Admission, recorder: Recorder = NULL_RECORDER
    ) -> None:
        self._gate = gate  # streams learn of the drain from it
        self._answered = recorder.frames_answered
        self._serving: ServingModel | None = None
        self._unary = UnaryDriver(
            ModelInferCodec(),
            serving=lambda: self._serving,
            admission=admission,
            recorder=recorder,
        )
        self._metadata: pb.ModelMetadataResponse | None = None
        self._config: pb.ModelConfigResponse | None = None
        self._server_metadata = pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the service: each call guarded, ModelInfer through the unary driver."""
        replacing = {MODEL_INFER: self._unary.handler()}
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            self, guarded(server, self._gate, replacing)
        )

    def attach(self, serving: ServingModel) -> None:
        """Start serving this model (after it has been loaded and warmed up)."""
        self._metadata = _describe(serving)
        self._config = _configure(serving)
        self._serving = serving

    def _model(self, name: str, version: str) -> ServingModel:
        """The served model if ``name`` and ``version`` ("" for the served one) designate it."""
        _check_name(name)
        serving = self._serving
        if serving is None:
            raise ModelNotReadyError
        _check_version(version, serving)
        return serving

    # ------------------------------------------------------------ health and metadata
    async def ServerLive(
        self,
        request: pb.ServerLiveRequest,
        context: grpc.aio.ServicerContext[pb.ServerLiveRequest, pb.ServerLiveResponse],
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self,
        request: pb.ServerReadyRequest,
        context: grpc.aio.ServicerContext[pb.ServerReadyRequest, pb.ServerReadyResponse],
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    def _ready(self) -> bool:
        return self._serving is not None and not self._serving.batcher.closed

    async def ModelReady(
        self,
        request: pb.ModelReadyRequest,
        context: grpc.aio.ServicerContext[pb.ModelReadyRequest, pb.ModelReadyResponse],
    ) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except (ModelNotFoundError, ModelNotReadyError):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(
        self,
        request: pb.ServerMetadataRequest,
        context: grpc.aio.ServicerContext[pb.ServerMetadataRequest, pb.ServerMetadataResponse],
    ) -> pb.ServerMetadataResponse:
        return self._server_metadata

    async def ModelMetadata(
        self,
        request: pb.ModelMetadataRequest,
        context: grpc.aio.ServicerContext[pb.ModelMetadataRequest, pb.ModelMetadataResponse],
    ) -> pb.ModelMetadataResponse:
        return self._described(request, self._metadata)

    async def ModelConfig(
        self,
        request: pb.ModelConfigRequest,
        context: grpc.aio.ServicerContext[pb.ModelConfigRequest, pb.ModelConfigResponse],
    ) -> pb.ModelConfigResponse:
        return self._described(request, self._config)

    def _described(
        self, request: pb.ModelMetadataRequest | pb.ModelConfigRequest, answer: _T | None
    ) -> _T:
        """``answer`` (a description of the model, made on attach) if the request names it."""
        self._model(request.name, request.version)
        assert answer is not None  # set before _serving
        return answer

    async def ModelStatistics(
        self,
        request: pb.ModelStatisticsRequest,
        context: grpc.aio.ServicerContext[pb.ModelStatisticsRequest, pb.ModelStatisticsResponse],
    ) -> pb.ModelStatisticsResponse:
        # An empty name asks for every model: the one served.
        serving = self._model(request.name or MODEL_NAME, request.version)
        return pb.ModelStatisticsResponse(model_stats=[_statistics(serving)])

    # ------------------------------------------------------------ inference
    async def ModelInfer(
        self,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext[pb.ModelInferRequest, pb.ModelInferResponse],
    ) -> pb.ModelInferResponse:
        """Never called: add_to_server registers ModelInfer through the unary driver."""
        raise NotImplementedError("ModelInfer is served by the unary driver (unary.py)")

    async def ModelStreamInfer(  # type: ignore[override]  # writes its responses (grpc's writer form)
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[pb.ModelInferRequest, pb.ModelStreamInferResponse],
    ) -> None:
        # Admission, flow control and the drain as for our own ClassifyStream (one place:
        # streaming.admitted); this maps requests and responses, and writes the responses
        # itself (context.write), as ClassifyStream does: no generator layer per answer.
        serving, call_deadline = ready(self._serving, context)  # a stream's deadline is fixed

        async def prepare(request: pb.ModelInferRequest) -> Prepared[_Tag]:
            request_id, name, version = request.id, request.model_name, request.model_version
            try:
                outputs, batch, deadline = _read(request, serving, call_deadline)
            except Exception as exc:
                return (request_id, name, version, []), status_for(exc), None
            return (request_id, name, version, outputs), batch, deadline

        answers = admitted(
            request_iterator,
            prepare,
            batcher=serving.batcher,
            caller=caller_of(context),  # for the batcher's fair order: the connection
            gate=self._gate,
            context=context,
        )
        async with contextlib.aclosing(answers):
            async for (request_id, name, version, outputs), outcome in answers:
                if isinstance(outcome, tuple):
                    code, text = outcome
                else:
                    try:
                        items = await outcome
                    except Exception as exc:
                        code, text = status_for(exc)
                    else:
                        message = pb.ModelStreamInferResponse()
                        _fill_response(message.infer_response, serving, request_id, outputs, items)
                        self._answered(MODEL_STREAM_INFER, "OK", len(items))
                        await context.write(message)
                        continue
                # Triton's stream error: the text, and the request's id to match it by.
                self._answered(MODEL_STREAM_INFER, code.name, 1)
                await context.write(
                    pb.ModelStreamInferResponse(
                        error_message=text,
                        infer_response=pb.ModelInferResponse(
                            model_name=name, model_version=version, id=request_id
                        ),
                    )
                )
