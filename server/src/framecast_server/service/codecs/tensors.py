"""Open Inference Protocol tensors as the server reads and writes them: messages <-> numpy.

Conventions of the protocol followed here: raw contents are one ``bytes`` entry per tensor, in
the order of the tensors, row-major and little-endian; a BYTES element is a 4-byte
little-endian length followed by its bytes; the classification extension answers an output
requested with the parameter ``classification=k`` with BYTES ``[batch, k]`` of
``"value:index:label"``, best first.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from framecast_client.wire_format import CHANNELS, WireFormatError
from framecast_oip import CLASSIFICATION, INPUT_NAME, OUTPUT_NAME
from framecast_oip._proto import open_inference_pb2 as oip
from numpy.typing import NDArray

__all__ = [
    "CLASSIFICATION",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "RequestedOutput",
    "add_classes",
    "add_probabilities",
    "classification_element",
    "encode_bytes",
    "images_from_request",
    "requested_outputs",
]

_LENGTH = struct.Struct("<I")


class RequestedOutput(NamedTuple):
    """One output a request asks for: its name, and k when it wants the top k classes."""

    name: str
    class_count: int | None = None  # a NamedTuple: one is built for every request


def _int_parameter(parameter: oip.InferParameter, what: str) -> int:
    choice = parameter.WhichOneof("parameter_choice")
    if choice == "int64_param":
        return parameter.int64_param
    if choice == "uint64_param":
        return parameter.uint64_param
    raise WireFormatError(f"{what} must be an integer parameter, not {choice or 'empty'}")


def images_from_request(
    request: oip.ModelInferRequest, *, height: int, width: int, max_batch: int
) -> NDArray[np.uint8]:
    """Validate the request's one input and view it as uint8 [N, H, W, 3] (raw: no copy)."""
    inputs = request.inputs  # each access of a field builds a new wrapper: read it once
    tensor = inputs[0] if len(inputs) == 1 else None
    if tensor is None or tensor.name != INPUT_NAME:
        names = [t.name for t in inputs]
        raise WireFormatError(f"the model takes one input named {INPUT_NAME!r}, got {names}")
    if tensor.datatype != "UINT8":
        raise WireFormatError(
            f"input {INPUT_NAME!r} must be UINT8 (preprocessed RGB pixels), not "
            f"{tensor.datatype or 'an empty datatype'}"
        )
    shape = tensor.shape  # compared in place: a copy costs more than the checks
    if len(shape) != 4 or shape[1] != height or shape[2] != width or shape[3] != CHANNELS:
        raise WireFormatError(
            f"input {INPUT_NAME!r} has shape {list(shape)}; this model takes "
            f"[N, {height}, {width}, {CHANNELS}] (batch, height, width, RGB)"
        )
    n = shape[0]
    if not 1 <= n <= max_batch:
        raise WireFormatError(
            f"input {INPUT_NAME!r} holds {n} images; this server takes 1 to {max_batch} per request"
        )
    expected = n * height * width * CHANNELS
    dims = [n, height, width, CHANNELS]  # for the messages below
    raw = request.raw_input_contents
    if raw:
        if len(raw) != 1:
            raise WireFormatError(f"raw_input_contents has {len(raw)} entries for 1 input")
        if tensor.HasField("contents"):
            raise WireFormatError("an input has both raw_input_contents and typed contents")
        data = raw[0]  # each access copies a bytes field: read it once
        if len(data) != expected:
            raise WireFormatError(
                f"input {INPUT_NAME!r} carries {len(data)} bytes; shape {dims} of UINT8 needs "
                f"exactly {expected}"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(n, height, width, CHANNELS)
    values = tensor.contents.uint_contents
    if len(values) != expected:
        raise WireFormatError(
            f"input {INPUT_NAME!r} carries {len(values)} values in uint_contents; shape "
            f"{dims} needs exactly {expected} (or send raw_input_contents)"
        )
    array = np.asarray(values, dtype=np.uint32)
    if array.size and int(array.max()) > 255:
        raise WireFormatError(f"input {INPUT_NAME!r} holds values above 255 for UINT8")
    return array.astype(np.uint8).reshape(n, height, width, CHANNELS)


def requested_outputs(request: oip.ModelInferRequest, *, num_classes: int) -> list[RequestedOutput]:
    """The outputs a request asks for, validated; all of the model's when it names none."""
    if not request.outputs:
        return [RequestedOutput(OUTPUT_NAME)]
    outputs: list[RequestedOutput] = []
    for tensor in request.outputs:
        if tensor.name != OUTPUT_NAME:
            raise WireFormatError(
                f"unknown output {tensor.name!r}: this model has one output, {OUTPUT_NAME!r}"
            )
        k: int | None = None
        if CLASSIFICATION in tensor.parameters:
            k = _int_parameter(tensor.parameters[CLASSIFICATION], CLASSIFICATION)
            if not 1 <= k <= num_classes:
                raise WireFormatError(
                    f"classification must be between 1 and {num_classes}, got {k}"
                )
        outputs.append(RequestedOutput(tensor.name, k))
    return outputs


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES tensor data in raw form: each element's 4-byte little-endian length, then it."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def classification_element(probability: float, index: int, label: str) -> bytes:
    """One element of the classification extension: ``value:index:label``."""
    return f"{probability:f}:{index}:{label}".encode()


def add_probabilities(
    response: oip.ModelInferResponse, name: str, probabilities: NDArray[np.float32]
) -> None:
    """Append an FP32 [N, C] output as raw contents (tritonclient reads only raw outputs)."""
    tensor = response.outputs.add(name=name, datatype="FP32")
    tensor.shape.extend(probabilities.shape)
    response.raw_output_contents.append(probabilities.astype("<f4", copy=False).tobytes())


def add_classes(
    response: oip.ModelInferResponse, name: str, rows: Sequence[Sequence[bytes]]
) -> None:
    """Append a classification output: BYTES [N, k] of ``value:index:label`` elements."""
    tensor = response.outputs.add(name=name, datatype="BYTES")
    tensor.shape.extend((len(rows), len(rows[0]) if rows else 0))
    response.raw_output_contents.append(encode_bytes([e for row in rows for e in row]))
