"""Helpers for the model-layer tests: photo-like images, ONNX Runtime runs, tiny ONNX
classifiers with closed-form outputs, and a fake of the Hugging Face hub."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from framecast_server.model import Preset
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

HUB_PATH = "/timm/resnet50.tv2_in1k/resolve/main/model.safetensors"


def photo_like(count: int, *, seed: int, size: int = 224) -> NDArray[np.uint8]:
    """uint8 RGB images with structure a classifier reacts to: colour gradients, a few filled
    discs and rectangles, and mild noise; each image and each channel differs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    images = np.empty((count, size, size, 3), dtype=np.float64)
    for n in range(count):
        a, b, c = rng.uniform(-1.0, 1.0, size=(3, 3))
        img = 128.0 + 100.0 * (a * xx[..., None] + b * yy[..., None] + c * xx[..., None] ** 2)
        for _ in range(4):
            cy, cx, r = rng.uniform(0.15, 0.85), rng.uniform(0.15, 0.85), rng.uniform(0.05, 0.2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[disc] = rng.uniform(0, 255, size=3)
        y0, x0 = rng.integers(0, size // 2, size=2)
        img[y0 : y0 + size // 4, x0 : x0 + size // 3] = rng.uniform(0, 255, size=3)
        images[n] = img + rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def run_onnx(model: onnx.ModelProto | Path, images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """Run a served-contract graph on ONNX Runtime's CPU provider."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    (probs,) = session.run(["probabilities"], {"images": images})
    return np.asarray(probs)


def normalize(images: NDArray[np.uint8], preset: Preset) -> NDArray[np.float64]:
    """The preset's preprocessing, written out for the tests (float64, NHWC, model order)."""
    x = images.astype(np.float64)
    if preset.channel_order == "BGR":
        x = x[..., ::-1]
    normalized: NDArray[np.float64] = (x - np.array(preset.mean)) / np.array(preset.std)
    return normalized


def softmax(logits: NDArray[np.float64]) -> NDArray[np.float64]:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: NDArray[np.float64] = z / z.sum(axis=1, keepdims=True)
    return out


# The tiny classifiers read a 2x3 pixel patch: off-centre and not square, so a transposed or
# mirrored layout reads other pixels; small, so float32 rounding stays far below 1e-4 (a mean
# over all 50176 pixels would accumulate ~1e-4 rounding error in ONNX Runtime's ReduceMean).
PATCH_ROWS = (5, 7)
PATCH_COLS = (17, 20)


@dataclass
class TinyClassifier:
    """A float-input 'classifier' with a closed-form output: a fixed pixel patch of the
    normalized image, flattened, then a linear layer to 1000 classes (optionally a softmax)."""

    model: onnx.ModelProto
    weight: NDArray[np.float32]
    bias: NDArray[np.float32]
    layout: Literal["NCHW", "NHWC"]

    def expected(self, images: NDArray[np.uint8], preset: Preset) -> NDArray[np.float64]:
        x = normalize(images, preset)[:, slice(*PATCH_ROWS), slice(*PATCH_COLS), :]
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        features = x.reshape(len(images), -1)
        return softmax(features @ self.weight.T.astype(np.float64) + self.bias)


def tiny_classifier(
    *,
    layout: Literal["NCHW", "NHWC"] = "NCHW",
    dims: list[int | str] | None = None,
    softmax_output: bool = False,
    input_name: str = "input",
    output_name: str = "logits",
    num_classes: int = 1000,
    input_type: int = TensorProto.FLOAT,
    initializers_as_inputs: bool = False,
    baked_batch_reshape: bool = False,
    opset: int = 17,
    weight_scale: float = 1.0,
    seed: int = 0,
) -> TinyClassifier:
    """Build a tiny classifier body; the keyword arguments produce the odd shapes and names
    real exports have. ``weight_scale`` should be ~1/std of the normalized pixels: 1 for
    torchvision, 1/58 for caffe, so the logits spread by a few units."""
    rng = np.random.default_rng(seed)
    features = 3 * (PATCH_ROWS[1] - PATCH_ROWS[0]) * (PATCH_COLS[1] - PATCH_COLS[0])
    weight = rng.normal(0.0, weight_scale, size=(num_classes, features)).astype(np.float32)
    bias = rng.normal(0.0, 1.0, size=num_classes).astype(np.float32)
    if dims is None:
        dims = [1, 3, 224, 224] if layout == "NCHW" else [1, 224, 224, 3]
    axes = [2, 3] if layout == "NCHW" else [1, 2]
    starts, ends = [PATCH_ROWS[0], PATCH_COLS[0]], [PATCH_ROWS[1], PATCH_COLS[1]]
    inits = [numpy_helper.from_array(weight, "fc_w"), numpy_helper.from_array(bias, "fc_b")]
    nodes = []
    if opset >= 10:
        inits += [
            numpy_helper.from_array(np.array(starts, np.int64), "patch_starts"),
            numpy_helper.from_array(np.array(ends, np.int64), "patch_ends"),
            numpy_helper.from_array(np.array(axes, np.int64), "patch_axes"),
        ]
        slice_inputs = [input_name, "patch_starts", "patch_ends", "patch_axes"]
        nodes.append(helper.make_node("Slice", slice_inputs, ["patch"]))
    else:
        nodes.append(
            helper.make_node("Slice", [input_name], ["patch"], starts=starts, ends=ends, axes=axes)
        )
    if baked_batch_reshape:
        # What a careless export produces: batch size 1 frozen into a Reshape.
        inits.append(numpy_helper.from_array(np.array([1, features], np.int64), "shape_1xF"))
        nodes.append(helper.make_node("Reshape", ["patch", "shape_1xF"], ["flat"]))
    else:
        nodes.append(helper.make_node("Flatten", ["patch"], ["flat"], axis=1))
    last = output_name if not softmax_output else "scores"
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [last], transB=1))
    if softmax_output:
        nodes.append(helper.make_node("Softmax", ["scores"], [output_name], axis=1))
    inputs = [helper.make_tensor_value_info(input_name, input_type, dims)]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [1, num_classes])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return TinyClassifier(model=model, weight=weight, bias=bias, layout=layout)


@dataclass
class FakeHub:
    """A real HTTP server on loopback answering like the hub's resolve URLs."""

    url: str
    routes: dict[str, Callable[[BaseHTTPRequestHandler], None]]
    requests: list[str] = field(default_factory=list)

    def serve_file(self, path: str, content: bytes, *, checksum: str | None = "sha256") -> None:
        """Serve ``content``; like the hub, with its SHA-256 in X-Linked-Etag.

        ``checksum``: "sha256" (the content's), None (no header), or a value to send instead.
        """
        published = hashlib.sha256(content).hexdigest() if checksum == "sha256" else checksum

        def send(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Content-Length", str(len(content)))
            if published is not None:
                handler.send_header("X-Linked-Etag", f'"{published}"')
            handler.end_headers()
            handler.wfile.write(content)

        self.routes[path] = send

    def redirect(self, path: str, target: str, *, checksum: str | None = None) -> None:
        def send(handler: BaseHTTPRequestHandler) -> None:
            # The real hub answers resolve URLs with a redirect to its CDN, naming the LFS
            # object's SHA-256 in X-Linked-Etag.
            handler.send_response(302)
            handler.send_header("Location", target)
            handler.send_header("Content-Length", "0")
            if checksum is not None:
                handler.send_header("X-Linked-Etag", f'"{checksum}"')
            handler.end_headers()

        self.routes[path] = send

    def truncated(self, path: str, content: bytes, claimed: int) -> None:
        def send(handler: BaseHTTPRequestHandler) -> None:
            handler.send_response(200)
            handler.send_header("Content-Length", str(claimed))
            handler.end_headers()
            handler.wfile.write(content)
            handler.close_connection = True

        self.routes[path] = send
