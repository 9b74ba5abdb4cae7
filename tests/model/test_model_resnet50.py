"""The built ResNet-50 graph against an independent numpy forward pass of the unfolded weights."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from framecast_server.model import PRESETS, Preset, build_resnet50
from numpy.typing import NDArray

from .model_helpers import normalize, run_onnx, softmax

Weights = dict[str, NDArray[np.float32]]
TOLERANCE = 1e-4

# --- the reference: plain numpy, float64, NCHW, batch norm unfolded --------------------------


def conv2d(x: NDArray[np.float64], w: NDArray[np.float32], stride: int, pad: int) -> NDArray[Any]:
    """Cross-correlation by im2col: gather every kernel tap as a shifted, strided slice."""
    n, c, h, width = x.shape
    out_c, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (h + 2 * pad - k) // stride + 1
    wo = (width + 2 * pad - k) // stride + 1
    cols = np.empty((n, c, k, k, ho, wo))
    for i in range(k):
        for j in range(k):
            cols[:, :, i, j] = xp[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
    out = w.reshape(out_c, -1).astype(np.float64) @ cols.reshape(n, c * k * k, ho * wo)
    return out.reshape(n, out_c, ho, wo)


def batch_norm(x: NDArray[np.float64], w: Weights, name: str) -> NDArray[Any]:
    shape = (1, -1, 1, 1)
    mean = w[f"{name}.running_mean"].astype(np.float64).reshape(shape)
    var = w[f"{name}.running_var"].astype(np.float64).reshape(shape)
    gamma = w[f"{name}.weight"].astype(np.float64).reshape(shape)
    beta = w[f"{name}.bias"].astype(np.float64).reshape(shape)
    return (x - mean) / np.sqrt(var + 1e-5) * gamma + beta


def relu(x: NDArray[np.float64]) -> NDArray[Any]:
    return np.maximum(x, 0.0)


def max_pool_3x3_s2_p1(x: NDArray[np.float64]) -> NDArray[Any]:
    n, c, h, width = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ho, wo = (h - 1) // 2 + 1, (width - 1) // 2 + 1
    out = np.full((n, c, ho, wo), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(out, xp[:, :, i : i + 2 * ho : 2, j : j + 2 * wo : 2])
    return out


def bottleneck(x: NDArray[np.float64], w: Weights, p: str, stride: int) -> NDArray[Any]:
    y = relu(batch_norm(conv2d(x, w[f"{p}.conv1.weight"], 1, 0), w, f"{p}.bn1"))
    y = relu(batch_norm(conv2d(y, w[f"{p}.conv2.weight"], stride, 1), w, f"{p}.bn2"))
    y = batch_norm(conv2d(y, w[f"{p}.conv3.weight"], 1, 0), w, f"{p}.bn3")
    if f"{p}.downsample.0.weight" in w:
        x = batch_norm(conv2d(x, w[f"{p}.downsample.0.weight"], stride, 0), w, f"{p}.downsample.1")
    return relu(y + x)


def reference_probabilities(
    w: Weights, preset: Preset, images: NDArray[np.uint8]
) -> NDArray[np.float64]:
    x = normalize(images, preset).transpose(0, 3, 1, 2)
    x = relu(batch_norm(conv2d(x, w["conv1.weight"], 2, 3), w, "bn1"))
    x = max_pool_3x3_s2_p1(x)
    stages = (("layer1", 3, 1), ("layer2", 4, 2), ("layer3", 6, 2), ("layer4", 3, 2))
    for stage, blocks, stride in stages:
        for i in range(blocks):
            x = bottleneck(x, w, f"{stage}.{i}", stride if i == 0 else 1)
    features = x.mean(axis=(2, 3))
    logits = features @ w["fc.weight"].T.astype(np.float64) + w["fc.bias"]
    return softmax(logits)


def max_relative_error(actual: NDArray[Any], expected: NDArray[Any]) -> float:
    return float(np.max(np.abs(actual - expected) / expected))


def top5(p: NDArray[Any]) -> list[list[int]]:
    return np.argsort(-p, axis=1)[:, :5].tolist()  # type: ignore[no-any-return]


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", ["torchvision", "caffe"])
def test_graph_matches_numpy_reference(
    preset_name: str, request: pytest.FixtureRequest, images: NDArray[np.uint8]
) -> None:
    preset = PRESETS[preset_name]
    prefix = "tv" if preset_name == "torchvision" else "caffe"
    weights: Weights = request.getfixturevalue(f"{prefix}_weights")
    model: onnx.ModelProto = request.getfixturevalue(f"{prefix}_model")

    expected = reference_probabilities(weights, preset, images)
    actual = run_onnx(model, images)

    # The comparison is only meaningful on a softmax with real spread and a clear top-5.
    assert expected.max(axis=1).max() < 0.99
    assert expected.max(axis=1).min() > 0.01
    ranked = np.sort(np.log(expected), axis=1)[:, ::-1]
    gaps = ranked[:, :5] - ranked[:, 1:6]
    assert np.min(gaps) > 10 * TOLERANCE

    assert actual.shape == (4, 1000)
    assert actual.dtype == np.float32
    assert max_relative_error(actual, expected) < TOLERANCE
    assert top5(actual) == top5(expected)


@pytest.mark.slow
@pytest.mark.parametrize("preset_name", ["torchvision", "caffe"])
def test_reference_comparison_detects_wrong_preprocessing(
    preset_name: str, request: pytest.FixtureRequest, images: NDArray[np.uint8]
) -> None:
    """The comparison above would catch a missing or spurious channel flip, or normalization
    with the other preset: each moves the output far beyond the tolerance."""
    preset = PRESETS[preset_name]
    prefix = "tv" if preset_name == "torchvision" else "caffe"
    weights: Weights = request.getfixturevalue(f"{prefix}_weights")
    actual = run_onnx(request.getfixturevalue(f"{prefix}_model"), images)
    flipped_order = "RGB" if preset.channel_order == "BGR" else "BGR"
    wrong = [
        Preset(**{**preset.to_dict(), "channel_order": flipped_order}),
        PRESETS["caffe" if preset_name == "torchvision" else "torchvision"],
    ]
    for bad in wrong:
        # Keep the weights' BN calibration: only the image preprocessing differs.
        bad_expected = reference_probabilities(weights, bad, images[:2])
        # Symmetric relative difference: the wrong reference may underflow to exact zeros.
        difference = np.abs(actual[:2] - bad_expected) / np.maximum(actual[:2], bad_expected)
        assert difference.max() > 100 * TOLERANCE, bad


def test_served_graph_contract(tv_model: onnx.ModelProto) -> None:
    graph = tv_model.graph
    assert [o.domain for o in tv_model.opset_import] == [""]
    assert tv_model.opset_import[0].version == 17
    (inp,) = graph.input
    (out,) = graph.output
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "batch"
    assert [d.dim_value for d in in_dims[1:]] == [224, 224, 3]
    assert out.name == "probabilities"
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out_dims = out.type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "batch"
    assert out_dims[1].dim_value == 1000
    ops = [n.op_type for n in graph.node]
    # Batch norm folded away; 53 convolutions (49 in the bottlenecks and stem, 4 projections).
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 53
    first_conv = ops.index("Conv")
    # Preprocessing: Cast, then one Mul and one Add, Transpose to NCHW, no channel flip (RGB).
    assert [op for op in ops[:first_conv] if op != "Constant"] == [
        "Cast",
        "Mul",
        "Add",
        "Transpose",
    ]
    assert ops[-1] == "Softmax"
    onnx.checker.check_model(tv_model, full_check=True)


def test_caffe_graph_flips_channels(caffe_model: onnx.ModelProto) -> None:
    ops = [n.op_type for n in caffe_model.graph.node]
    first_conv = ops.index("Conv")
    pre = [op for op in ops[:first_conv] if op != "Constant"]
    assert pre == ["Cast", "Gather", "Mul", "Add", "Transpose"]


def test_batch_dimension_is_dynamic(tv_model: onnx.ModelProto, images: NDArray[np.uint8]) -> None:
    four = run_onnx(tv_model, images)
    one = run_onnx(tv_model, images[2:3])
    three = run_onnx(tv_model, images[:3])
    np.testing.assert_allclose(one[0], four[2], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(three, four[:3], rtol=1e-5, atol=1e-7)
    # Different images do get different answers (the output depends on the input).
    assert not np.allclose(four[0], four[1], rtol=1e-2)


def test_build_rejects_bad_weights(tv_weights: Weights) -> None:
    broken = dict(tv_weights)
    del broken["layer3.2.bn2.running_var"]
    with pytest.raises(ValueError, match=r"layer3\.2\.bn2\.running_var"):
        build_resnet50(broken, PRESETS["torchvision"])
