"""fp16 conversion of the served graph: valid, I/O types kept, weights fp16, same answers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from framecast_server.model.fp16 import convert_to_fp16
from onnx import TensorProto

from .trt_testing import make_images


def test_converted_model_is_valid_and_keeps_io_types(tiny_model: onnx.ModelProto) -> None:
    converted = convert_to_fp16(tiny_model)
    onnx.checker.check_model(converted, full_check=True)
    (inp,) = converted.graph.input
    (out,) = converted.graph.output
    assert (inp.name, inp.type.tensor_type.elem_type) == ("images", TensorProto.UINT8)
    assert (out.name, out.type.tensor_type.elem_type) == ("probabilities", TensorProto.FLOAT)
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 224, 224, 3]


def test_float_initializers_are_fp16(tiny_model: onnx.ModelProto) -> None:
    converted = convert_to_fp16(tiny_model)
    types = {init.name: init.data_type for init in converted.graph.initializer}
    assert types == dict.fromkeys(["mean", "std", "w1", "b1", "wf", "bf"], TensorProto.FLOAT16)


def test_leading_cast_goes_straight_to_fp16(tiny_model: onnx.ModelProto) -> None:
    converted = convert_to_fp16(tiny_model)
    first = next(n for n in converted.graph.node if "images" in n.input)
    assert first.op_type == "Cast"
    (to,) = [a.i for a in first.attribute if a.name == "to"]
    assert to == TensorProto.FLOAT16


def test_input_model_is_not_modified(tiny_model: onnx.ModelProto) -> None:
    before = tiny_model.SerializeToString()
    convert_to_fp16(tiny_model)
    assert tiny_model.SerializeToString() == before


def test_onnxruntime_cpu_top1_agrees_with_fp32(tiny_model: onnx.ModelProto) -> None:
    fp16 = ort.InferenceSession(
        convert_to_fp16(tiny_model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    fp32 = ort.InferenceSession(tiny_model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = make_images(256, seed=3)
    (p16,) = fp16.run(None, {"images": images})
    (p32,) = fp32.run(None, {"images": images})
    assert p16.dtype == np.float32
    assert p16.shape == (256, 1000)
    top32 = p32.argmax(axis=1)
    # The check is only meaningful if the model separates the images.
    assert len(set(top32.tolist())) >= 10
    agreement = float((p16.argmax(axis=1) == top32).mean())
    assert agreement >= 0.98, agreement
    assert float(np.abs(p16 - p32).max()) < 0.01


def test_softmax_runs_in_fp32_and_writes_the_output(tiny_model: onnx.ModelProto) -> None:
    converted = onnx.shape_inference.infer_shapes(convert_to_fp16(tiny_model), strict_mode=True)
    graph = converted.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.value_info, *graph.output]}
    (softmax,) = [n for n in graph.node if n.op_type == "Softmax"]
    assert types[softmax.input[0]] == TensorProto.FLOAT
    # Softmax itself produces the fp32 output: no fp16 round trip after it.
    assert list(softmax.output) == ["probabilities"]
    assert types["probabilities"] == TensorProto.FLOAT
    # Everything before the Softmax's input Cast stays fp16 (the Gemm's logits included).
    (cast,) = [n for n in graph.node if softmax.input[0] in n.output]
    assert (cast.op_type, types[cast.input[0]]) == ("Cast", TensorProto.FLOAT16)
