"""Test helpers shared by the device-free TensorRT tests: a tiny ONNX classifier with the
served I/O contract, and images it tells apart."""

from __future__ import annotations

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper


def make_tiny_model(seed: int = 0) -> onnx.ModelProto:
    """uint8 [batch,224,224,3] -> Cast -> normalize -> Conv/Relu -> GAP -> Gemm -> Softmax.

    The classifier weights are large so that probabilities are peaked and different images
    get different top-1 classes (otherwise top-1 agreement would be trivially 100%).
    """
    rng = np.random.default_rng(seed)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1) * 255
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1) * 255
    inits = [
        numpy_helper.from_array(mean, "mean"),
        numpy_helper.from_array(std, "std"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 3.0, (1000, 8)).astype(np.float32), "wf"),
        numpy_helper.from_array(rng.normal(0, 0.3, (1000,)).astype(np.float32), "bf"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT, name="cast_in"),
        helper.make_node("Transpose", ["xf"], ["xt"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Sub", ["xt", "mean"], ["xs"], name="sub_mean"),
        helper.make_node("Div", ["xs", "std"], ["xn"], name="div_std"),
        helper.make_node(
            "Conv", ["xn", "w1", "b1"], ["c1"], strides=[4, 4], pads=[1, 1, 1, 1], name="conv"
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r1"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 224, 224, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def make_images(n: int, seed: int = 0) -> NDArray[np.uint8]:
    """Noisy images of random per-image colours, so pooled features differ between images."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 1, 1, 3))
    noisy = colours + rng.normal(0, 40, (n, 224, 224, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)
