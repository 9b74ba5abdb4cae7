"""wrap_external_onnx: a user's float-input classifier gets the served uint8 contract."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx
import pytest
from framecast_server.model import PRESETS, Preset, wrap_external_onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper

from .model_helpers import photo_like, run_onnx, tiny_classifier


def max_relative_error(actual: NDArray[Any], expected: NDArray[Any]) -> float:
    return float(np.max(np.abs(actual - expected) / expected))


def assert_served_contract(model: onnx.ModelProto) -> None:
    (inp,) = [i for i in model.graph.input if i.name == "images"]
    assert model.graph.input[0].name == "images"
    assert inp.type.tensor_type.elem_type == TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [224, 224, 3]
    (out,) = model.graph.output
    assert out.name == "probabilities"
    assert out.type.tensor_type.elem_type == TensorProto.FLOAT
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.type.tensor_type.shape.dim[1].dim_value == 1000


def resnet_body(served: onnx.ModelProto, layout: Literal["NCHW", "NHWC"], softmax: bool) -> Any:
    """Cut a built served graph back to a float-input network, as a user's export would be:
    everything from the first Conv, static batch 1, optionally without its Softmax."""
    g = served.graph
    ops = [n.op_type for n in g.node]
    first = ops.index("Conv")
    body_input = g.node[first].input[0]
    nodes = list(g.node[first:])
    output = "probabilities"
    if not softmax:
        assert nodes[-1].op_type == "Softmax"
        output = nodes[-1].input[0]
        nodes = nodes[:-1]
    if layout == "NHWC":
        nodes.insert(0, helper.make_node("Transpose", ["x_nhwc"], [body_input], perm=[0, 3, 1, 2]))
        inputs = [helper.make_tensor_value_info("x_nhwc", TensorProto.FLOAT, [1, 224, 224, 3])]
    else:
        inputs = [helper.make_tensor_value_info(body_input, TensorProto.FLOAT, [1, 3, 224, 224])]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, 1000])]
    graph = helper.make_graph(nodes, "user_resnet", inputs, outputs, list(g.initializer))
    body = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    body.ir_version = 8
    onnx.checker.check_model(body)
    return body


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "softmax"), [("NCHW", False), ("NHWC", True)], ids=["nchw-logits", "nhwc-softmax"]
)
def test_wrapped_resnet_matches_built_graph(
    layout: Literal["NCHW", "NHWC"],
    softmax: bool,
    tv_model: onnx.ModelProto,
    images: NDArray[np.uint8],
) -> None:
    body = resnet_body(tv_model, layout, softmax)
    wrapped = wrap_external_onnx(body, PRESETS["torchvision"])
    assert_served_contract(wrapped)
    assert [n.op_type for n in wrapped.graph.node].count("Softmax") == 1
    expected = run_onnx(tv_model, images)
    actual = run_onnx(wrapped, images)  # batch 4 through a graph exported with batch 1
    assert max_relative_error(actual, expected) < 1e-5


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("preset_name", ["torchvision", "caffe"])
@pytest.mark.parametrize("softmax_output", [False, True])
def test_preprocessing_of_wrapped_models(
    layout: Literal["NCHW", "NHWC"], preset_name: str, softmax_output: bool
) -> None:
    """A classifier whose output has a closed form checks the wrapper's normalization, channel
    flip, layout handling, softmax handling and dynamic batch in one comparison."""
    preset = PRESETS[preset_name]
    scale = 1.0 if preset_name == "torchvision" else 1.0 / 58.0
    tiny = tiny_classifier(layout=layout, softmax_output=softmax_output, weight_scale=scale, seed=3)
    wrapped = wrap_external_onnx(tiny.model, preset)
    assert_served_contract(wrapped)
    assert [n.op_type for n in wrapped.graph.node].count("Softmax") == 1
    images = photo_like(3, seed=11)
    actual = run_onnx(wrapped, images)
    assert max_relative_error(actual, tiny.expected(images, preset)) < 1e-4
    # The same check would catch a missing or spurious channel flip.
    flipped = Preset(
        **{**preset.to_dict(), "channel_order": "RGB" if preset_name == "caffe" else "BGR"}
    )
    assert max_relative_error(actual, tiny.expected(images, flipped)) > 1e-2


def test_wrapping_leaves_the_input_model_alone() -> None:
    tiny = tiny_classifier()
    before = tiny.model.SerializeToString()
    wrap_external_onnx(tiny.model, PRESETS["torchvision"])
    assert tiny.model.SerializeToString() == before


def test_reserved_names_in_the_user_graph() -> None:
    """A body that already calls its tensors images/probabilities is renamed, not clobbered."""
    tiny = tiny_classifier(
        input_name="images",
        output_name="probabilities",
        softmax_output=True,
        weight_scale=1.0 / 58.0,
    )
    wrapped = wrap_external_onnx(tiny.model, PRESETS["caffe"])
    assert_served_contract(wrapped)
    images = photo_like(2, seed=5)
    expected = tiny.expected(images, PRESETS["caffe"])
    assert max_relative_error(run_onnx(wrapped, images), expected) < 1e-4


def test_old_ir_model_with_initializers_listed_as_inputs() -> None:
    tiny = tiny_classifier(initializers_as_inputs=True, opset=8)
    tiny.model.ir_version = 3  # IR 3 requires every initializer to be a graph input
    wrapped = wrap_external_onnx(tiny.model, PRESETS["torchvision"])
    assert_served_contract(wrapped)
    images = photo_like(2, seed=6)
    expected = tiny.expected(images, PRESETS["torchvision"])
    assert max_relative_error(run_onnx(wrapped, images), expected) < 1e-4


def test_dynamic_spatial_dims_are_accepted() -> None:
    tiny = tiny_classifier(dims=["N", 3, "H", "W"])
    wrapped = wrap_external_onnx(tiny.model, PRESETS["torchvision"])
    assert_served_contract(wrapped)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dims": [1, 3, 224]}, "must be a 4-D image batch"),
        ({"dims": [1, 1, 224, 224]}, r"shape \[1, 1, 224, 224\], which does not match"),
        ({"dims": [1, 3, 299, 299]}, "input_size 224"),
        ({"dims": ["N", "C", "H", "W"]}, "channel axis must be static 3"),
        ({"input_type": TensorProto.UINT8}, "must be float32, got UINT8"),
        ({"num_classes": 10}, r"expected \[N, 1000\]"),
        ({"opset": 6}, "opset 6 is too old"),
    ],
)
def test_models_not_shaped_like_imagenet_classifiers(kwargs: Any, message: str) -> None:
    tiny = tiny_classifier(**kwargs)
    with pytest.raises(ValueError, match=message):
        wrap_external_onnx(tiny.model, PRESETS["torchvision"])


def test_more_than_one_input_or_output() -> None:
    tiny = tiny_classifier()
    two_in = onnx.ModelProto()
    two_in.CopyFrom(tiny.model)
    two_in.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1]))
    with pytest.raises(ValueError, match=r"exactly one image input, found 2: \['input', 'mask'\]"):
        wrap_external_onnx(two_in, PRESETS["torchvision"])
    two_out = onnx.ModelProto()
    two_out.CopyFrom(tiny.model)
    two_out.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None))
    with pytest.raises(ValueError, match="exactly one output"):
        wrap_external_onnx(two_out, PRESETS["torchvision"])
