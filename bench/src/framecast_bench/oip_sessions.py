"""``framecast bench --protocol oip``: the same load over the Open Inference Protocol.

Any server that speaks ``inference.GRPCInferenceService`` (Triton, KServe, MLServer, Framecast's
own OIP endpoint) can be measured with the same load patterns and report as Framecast's protocol,
so one table compares them. The target is discovered as perf_analyzer does it: ServerMetadata,
ModelMetadata and ModelConfig. The model must take one UINT8 input ``[-1, H, W, 3]`` (an RGB
frame) and give one FP32 output; results come back through the classification extension
(``class_count = --top-k``), so every server does its own top-k, as Framecast's Classify does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from framecast_client.connections import OWN_CONNECTION_OPTION
from framecast_client.preprocess import PreprocessSpec
from framecast_client.types import Classification, ModelInfo
from framecast_oip import INPUT_NAME, OUTPUT_NAME
from framecast_oip._proto import open_inference_pb2 as pb
from framecast_oip._proto import open_inference_pb2_grpc as pb_grpc
from numpy.typing import NDArray

from framecast_bench import oip_codec as oip
from framecast_bench.inputs import Payload
from framecast_bench.plan import (
    BenchPlan,
    ClosedStep,
    OpenStep,
    plan_steps,
    unary_steps,
)
from framecast_bench.runner import (
    BenchUnavailableError,
    Mode,
)
from framecast_bench.stream_runner import run_stream_closed_step, run_stream_open_step

DEFAULT_MODEL = "resnet50"  # the name Framecast serves its model under
# As tritonclient does: the default 4 MiB receive limit is a few frames.
_MAX_MESSAGE_BYTES = 2**31 - 1


class OipTarget:
    """A channel to an Open Inference Protocol server and what it says about one model."""

    def __init__(self, address: str, *, model: str, timeout: float | None) -> None:
        self.address = address
        self.model = model
        self.timeout = timeout
        self._channel, self.stub = self.connect()
        self.input_name = INPUT_NAME
        self.output_name = OUTPUT_NAME

    def __enter__(self) -> OipTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def connect(self) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
        """A channel of its own connection, and its stub; the caller closes the channel.

        Each session gets one: servers cap the calls running at once on one connection
        (Framecast at 2 by default), and a stream holds its slot for as long as it lasts.
        """
        channel = grpc.insecure_channel(
            self.address,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                OWN_CONNECTION_OPTION,
            ],
        )
        return channel, pb_grpc.GRPCInferenceServiceStub(channel)

    def discover(self) -> ModelInfo:
        """ServerMetadata, ModelMetadata and ModelConfig, read into a ModelInfo.

        Raises BenchUnavailableError when the server cannot be reached or the model does not
        take RGB uint8 frames.
        """
        try:
            server = self.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=self.timeout)
            meta = self.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=self.model), timeout=self.timeout
            )
            config = self.stub.ModelConfig(
                pb.ModelConfigRequest(name=self.model), timeout=self.timeout
            ).config
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            raise BenchUnavailableError(
                f"no Open Inference Protocol model {self.model!r} at {self.address}: "
                f"{getattr(code, 'name', 'error')}: {details}"
            ) from exc
        frames = [t for t in meta.inputs if t.datatype == "UINT8" and len(t.shape) == 4]
        outputs = [t for t in meta.outputs if t.datatype == "FP32"]
        if len(meta.inputs) != 1 or not frames or frames[0].shape[3] != 3 or len(outputs) != 1:
            raise BenchUnavailableError(
                f"model {self.model!r} at {self.address} does not take one UINT8 [-1, H, W, 3] "
                "input and give one FP32 output; the OIP bench sends RGB frames"
            )
        self.input_name, self.output_name = frames[0].name, outputs[0].name
        height, width = int(frames[0].shape[1]), int(frames[0].shape[2])
        return ModelInfo(
            name=meta.name,
            version=meta.versions[0] if meta.versions else "",
            backend=f"{server.name} {server.version} ({config.backend or meta.platform})",
            precision="",
            max_batch=config.max_batch_size,
            preprocessing=_preprocessing(meta, height, width),
            normalization=meta.properties.get("normalization", ""),
            pretrained=meta.properties.get("pretrained") == "true",
            weights_source="",
            warning=meta.properties.get("warning", ""),
            labels=(),
            max_message_bytes=_MAX_MESSAGE_BYTES,
        )

    def request(
        self, batch: NDArray[np.uint8], *, top_k: int, request_id: str = ""
    ) -> pb.ModelInferRequest:
        """A request for ``batch`` asking for the top ``top_k`` classes."""
        return oip.infer_request(
            batch,
            model_name=self.model,
            request_id=request_id,
            class_count=top_k,
            input_name=self.input_name,
            output_name=self.output_name,
        )


def _preprocessing(meta: pb.ModelMetadataResponse, height: int, width: int) -> PreprocessSpec:
    """What Framecast's metadata properties say; for other servers, the ImageNet default."""
    properties = meta.properties
    if "resize_policy" in properties:
        return PreprocessSpec(
            input_height=height,
            input_width=width,
            resize_policy=properties["resize_policy"],  # type: ignore[arg-type]
            resize_size=int(properties["resize_size"]),
            interpolation=properties["interpolation"],  # type: ignore[arg-type]
        )
    # Shorter side to 256/224 of the crop, then the centre crop, as torchvision's ImageNet eval.
    return PreprocessSpec(
        input_height=height, input_width=width, resize_size=round(max(height, width) * 256 / 224)
    )


class OipSession:
    """Unary and batch modes: one ModelInfer call per payload, on the session's own connection."""

    def __init__(self, target: OipTarget, *, top_k: int) -> None:
        self._target = target
        self._top_k = top_k
        self._channel, self._stub = target.connect()

    def send(self, payload: Payload) -> Sequence[Classification]:
        """Send the payload's images in one ModelInfer call."""
        target = self._target
        request = target.request(payload.batch, top_k=self._top_k)
        response = self._stub.ModelInfer(request, timeout=target.timeout)
        return oip.classifications_from_response(response)

    def close(self) -> None:
        """Close this session's connection."""
        self._channel.close()


class OipStreamError(Exception):
    """A stream request answered with an error message instead of a response."""


@dataclass(frozen=True, slots=True)
class _StreamResult:
    index: int
    outcome: Classification | Exception


class OipStream:
    """One ModelStreamInfer call fed from ``frames``, at most ``max_in_flight`` outstanding.

    Iterating yields one result per frame, tagged with the frame's position (sent as the
    request id, as clients match stream responses to requests).
    """

    def __init__(
        self, target: OipTarget, frames: Iterable[Any], max_in_flight: int, *, top_k: int
    ) -> None:
        self._target = target
        self._window = threading.Semaphore(max_in_flight)
        self._closed = threading.Event()
        self._top_k = top_k
        self._channel, stub = target.connect()
        self._call = stub.ModelStreamInfer(self._requests(frames))

    def _requests(self, frames: Iterable[Any]) -> Iterator[pb.ModelInferRequest]:
        for index, frame in enumerate(frames):
            while not self._window.acquire(timeout=0.1):
                if self._closed.is_set():
                    return
            if self._closed.is_set():
                return
            yield self._target.request(frame[None], top_k=self._top_k, request_id=str(index))

    def __iter__(self) -> Iterator[_StreamResult]:
        try:
            for response in self._call:
                self._window.release()
                index = int(response.infer_response.id)
                if response.error_message:
                    yield _StreamResult(index, OipStreamError(response.error_message))
                    continue
                (result,) = oip.classifications_from_response(response.infer_response)
                yield _StreamResult(index, result)
        except grpc.RpcError:
            if not self._closed.is_set():  # our own close() cancels the call: not an error
                raise

    def close(self) -> None:
        """End the stream (requests not yet answered are abandoned)."""
        self._closed.set()
        self._call.cancel()  # type: ignore[no-untyped-call]
        self._channel.close()


def oip_steps(
    target: OipTarget,
    mode: Mode,
    payloads: Sequence[Payload],
    plan: BenchPlan,
    *,
    top_k: int,
) -> tuple[ClosedStep, OpenStep]:
    """The step drivers of ``mode`` over the Open Inference Protocol."""
    if mode in ("unary", "batch"):
        return unary_steps(lambda: OipSession(target, top_k=top_k), payloads, plan)

    def open_stream(frames: Iterable[Any], max_in_flight: int) -> OipStream:
        return OipStream(target, frames, max_in_flight, top_k=top_k)

    return plan_steps(run_stream_closed_step, run_stream_open_step, open_stream, payloads, plan)
