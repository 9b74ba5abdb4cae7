"""Open Inference Protocol requests and results as the bench writes and reads them.

``framecast bench --protocol oip`` builds requests and reads results with it, against any Open
Inference Protocol server (Framecast, Triton, KServe). The server's side of the same tensors is
``framecast_server.service.codecs.tensors``.

Conventions of the protocol followed here: raw contents are one ``bytes`` entry per tensor, in
the order of the tensors, row-major and little-endian; a BYTES element is a 4-byte
little-endian length followed by its bytes; the classification extension answers an output
requested with the parameter ``classification=k`` with BYTES ``[batch, k]`` of
``"value:index:label"``, best first.
"""

from __future__ import annotations

import struct

import numpy as np
from framecast_client.types import Classification, Prediction
from framecast_client.wire_format import CHANNELS, WireFormatError
from framecast_oip import CLASSIFICATION, INPUT_NAME, OUTPUT_NAME
from framecast_oip._proto import open_inference_pb2 as oip
from numpy.typing import NDArray

_LENGTH = struct.Struct("<I")


def decode_bytes(data: bytes) -> list[bytes]:
    """The elements of a raw BYTES tensor."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise WireFormatError("a BYTES tensor ends inside an element's length")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            raise WireFormatError("a BYTES tensor ends inside an element")
        elements.append(data[offset : offset + length])
        offset += length
    return elements


def infer_request(
    batch: NDArray[np.uint8],
    *,
    model_name: str,
    model_version: str = "",
    request_id: str = "",
    class_count: int | None = None,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> oip.ModelInferRequest:
    """A ModelInfer request for preprocessed images uint8 [N, H, W, 3], inputs as raw bytes.

    ``class_count`` asks for the top k classes (the classification extension) instead of the
    whole probability vector.
    """
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != CHANNELS:
        raise WireFormatError(f"expected uint8 [N, H, W, 3], got {batch.dtype} {batch.shape}")
    request = oip.ModelInferRequest(
        model_name=model_name, model_version=model_version, id=request_id
    )
    tensor = request.inputs.add(name=input_name, datatype="UINT8")
    tensor.shape.extend(batch.shape)
    request.raw_input_contents.append(np.ascontiguousarray(batch).tobytes())
    output = request.outputs.add(name=output_name)
    if class_count is not None:
        output.parameters[CLASSIFICATION].int64_param = class_count
    return request


def _parse_element(element: bytes) -> Prediction:
    value, index, *label = element.decode().split(":", 2)
    return Prediction(index=int(index), label=label[0] if label else "", probability=float(value))


def classifications_from_response(response: oip.ModelInferResponse) -> list[Classification]:
    """One typed result per image from a response's classification (or probabilities) output."""
    for position, tensor in enumerate(response.outputs):
        if position >= len(response.raw_output_contents):
            break
        data = response.raw_output_contents[position]
        if tensor.datatype == "BYTES":
            rows, k = int(tensor.shape[0]), int(tensor.shape[1])
            elements = decode_bytes(data)
            if len(elements) != rows * k:
                raise WireFormatError(f"output {tensor.name!r} has {len(elements)} elements")
            return [
                Classification(
                    predictions=tuple(_parse_element(e) for e in elements[r * k : (r + 1) * k]),
                    timing=None,
                )
                for r in range(rows)
            ]
        if tensor.datatype == "FP32":
            probabilities = np.frombuffer(data, dtype="<f4").reshape(tuple(tensor.shape))
            return [
                Classification(
                    predictions=(
                        Prediction(index=int(row.argmax()), label="", probability=float(row.max())),
                    ),
                    timing=None,
                )
                for row in probabilities
            ]
    raise WireFormatError("the response holds no raw FP32 or BYTES output to read")
