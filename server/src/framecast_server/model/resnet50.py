"""The served ONNX graphs: ResNet-50 built from weights, or a user's own ONNX classifier wrapped.

Both kinds of graph share one contract, the one every backend relies on:

* input ``images``: uint8 ``[batch, S, S, 3]``, RGB, NHWC, S = the preset's ``input_size``;
* output ``probabilities``: float32 ``[batch, 1000]``, a softmax over ImageNet classes;
* the batch dimension is dynamic (``dim_param`` ``batch``).

Normalization lives inside the graph (one Cast, an optional RGB->BGR Gather, one Mul, one Add,
and a Transpose for NCHW bodies) so that clients send raw pixels and every backend, including a
TensorRT engine built from this graph, applies exactly the same preprocessing.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from framecast_server.model.labels import NUM_CLASSES
from framecast_server.model.presets import Preset
from framecast_server.model.weights import WeightDict, blocks, conv_bn_shapes, validate

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
BATCH_DIM = "batch"
OPSET = 17
# IR 8 is what opset 17 shipped with; pinning it keeps the files loadable by older ONNX
# Runtime and TensorRT parsers than the installed onnx package would otherwise target.
IR_VERSION = 8
BN_EPS = 1e-5
#: Bump whenever the graphs these functions produce change, so cached builds are redone.
BUILDER_VERSION = "1"

Layout = Literal["NCHW", "NHWC"]


def preprocessing_nodes(
    preset: Preset, *, input_name: str, output_name: str, layout: Layout, prefix: str
) -> list[onnx.NodeProto]:
    """Nodes turning uint8 RGB NHWC ``input_name`` into the normalized float ``output_name``.

    ``layout`` is the layout the network body expects: NHWC output is left as is, NCHW gets a
    final Transpose. Constants are Constant nodes rather than initializers so the nodes can be
    spliced into any graph, including old-IR models that require initializers to be inputs.
    Intermediate tensors are named ``{prefix}/...``.
    """
    nodes: list[onnx.NodeProto] = []

    def const(name: str, array: NDArray[Any]) -> str:
        full = f"{prefix}/{name}"
        nodes.append(
            helper.make_node(
                "Constant", [], [full], name=full, value=numpy_helper.from_array(array, full)
            )
        )
        return full

    steps: list[tuple[str, list[str], dict[str, Any]]] = [("Cast", [], {"to": TensorProto.FLOAT})]
    if preset.channel_order == "BGR":
        # The wire format is RGB; reversing the last axis gives the BGR the model expects.
        steps.append(("Gather", [const("bgr_index", np.array([2, 1, 0], np.int64))], {"axis": 3}))
    # (x - mean) / std == x * (1 / std) + (-mean / std): one Mul and one Add, computed in float64
    # so the folded constants are as close as float32 allows.
    mean = np.asarray(preset.mean, np.float64)
    std = np.asarray(preset.std, np.float64)
    steps.append(("Mul", [const("scale", (1.0 / std).astype(np.float32))], {}))
    steps.append(("Add", [const("shift", (-mean / std).astype(np.float32))], {}))
    if layout == "NCHW":
        steps.append(("Transpose", [], {"perm": [0, 3, 1, 2]}))

    current = input_name
    for i, (op, extra_inputs, attrs) in enumerate(steps):
        out = output_name if i == len(steps) - 1 else f"{prefix}/{op.lower()}"
        nodes.append(
            helper.make_node(op, [current, *extra_inputs], [out], name=f"{prefix}/{op}", **attrs)
        )
        current = out
    return nodes


def _fold_batch_norm(w: WeightDict, conv: str, bn: str) -> tuple[NDArray[Any], NDArray[Any]]:
    """Return (weight, bias) of ``conv`` followed by inference-mode batch norm ``bn``."""
    gamma = w[f"{bn}.weight"].astype(np.float64)
    beta = w[f"{bn}.bias"].astype(np.float64)
    mean = w[f"{bn}.running_mean"].astype(np.float64)
    var = w[f"{bn}.running_var"].astype(np.float64)
    scale = gamma / np.sqrt(var + BN_EPS)
    weight = w[f"{conv}.weight"].astype(np.float64) * scale[:, None, None, None]
    bias = beta - mean * scale
    return weight.astype(np.float32), bias.astype(np.float32)


def _io_value_infos(size: int) -> tuple[onnx.ValueInfoProto, onnx.ValueInfoProto]:
    images = helper.make_tensor_value_info(
        INPUT_NAME, TensorProto.UINT8, [BATCH_DIM, size, size, 3]
    )
    probs = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, NUM_CLASSES])
    return images, probs


def _set_metadata(model: onnx.ModelProto, preset: Preset, kind: str) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props.update(
        {
            "framecast.kind": kind,
            "framecast.preset": preset.name,
            "framecast.builder_version": BUILDER_VERSION,
        }
    )
    helper.set_model_props(model, props)


def build_resnet50(weights: Mapping[str, NDArray[Any]], preset: Preset) -> onnx.ModelProto:
    """Build the served ResNet-50 v1.5 graph from torchvision-named weights.

    Batch norms are folded into the convolutions (eps 1e-5). Raises WeightsError (a ValueError)
    when the weights do not fit ResNet-50.
    """
    w = validate(weights, "weights")
    folded = {conv: _fold_batch_norm(w, conv, bn) for conv, bn, _ in conv_bn_shapes()}
    nodes: list[onnx.NodeProto] = []
    initializers: list[TensorProto] = []

    def conv(x: str, name: str, stride: int, relu: bool) -> str:
        weight, bias = folded[name]
        k = weight.shape[2]
        initializers.append(numpy_helper.from_array(weight, f"{name}.weight"))
        initializers.append(numpy_helper.from_array(bias, f"{name}.bias"))
        pad = k // 2
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [name],
                name=name,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad, pad, pad, pad],
            )
        )
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}.relu"))
        return f"{name}.relu"

    nodes += preprocessing_nodes(
        preset, input_name=INPUT_NAME, output_name="input", layout="NCHW", prefix="preprocess"
    )
    x = conv("input", "conv1", stride=2, relu=True)
    nodes.append(
        helper.make_node(
            "MaxPool",
            [x],
            ["maxpool"],
            name="maxpool",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        )
    )
    x = "maxpool"
    for b in blocks():
        p = b.prefix
        # v1.5: the stride sits on the 3x3 convolution, not the first 1x1.
        y = conv(x, f"{p}.conv1", stride=1, relu=True)
        y = conv(y, f"{p}.conv2", stride=b.stride, relu=True)
        y = conv(y, f"{p}.conv3", stride=1, relu=False)
        shortcut = conv(x, f"{p}.downsample.0", b.stride, relu=False) if b.has_downsample else x
        nodes.append(helper.make_node("Add", [y, shortcut], [f"{p}.add"], name=f"{p}.add"))
        nodes.append(helper.make_node("Relu", [f"{p}.add"], [p], name=f"{p}.relu"))
        x = p
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["avgpool"], name="avgpool"))
    nodes.append(helper.make_node("Flatten", ["avgpool"], ["flatten"], name="flatten", axis=1))
    initializers.append(numpy_helper.from_array(w["fc.weight"], "fc.weight"))
    initializers.append(numpy_helper.from_array(w["fc.bias"], "fc.bias"))
    nodes.append(
        helper.make_node(
            "Gemm", ["flatten", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1
        )
    )
    nodes.append(helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], name="softmax", axis=1))

    images, probs = _io_value_infos(preset.input_size)
    graph = helper.make_graph(nodes, "framecast_resnet50", [images], [probs], initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="framecast",
        producer_version=BUILDER_VERSION,
    )
    _set_metadata(model, preset, "resnet50")
    onnx.checker.check_model(model, full_check=True)
    return model


# --- wrapping a user's ONNX classifier -------------------------------------------------------


def _subgraphs(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info)}
    names.update(t.name for t in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for sub in _subgraphs(node):
            names |= _all_names(sub)
    names.discard("")
    return names


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere, including captured uses in subgraphs."""
    for v in itertools.chain(graph.input, graph.output, graph.value_info):
        if v.name == old:
            v.name = new
    for t in graph.initializer:
        if t.name == old:
            t.name = new
    for node in graph.node:
        for seq in (node.input, node.output):
            for i, name in enumerate(seq):
                if name == old:
                    seq[i] = new
        for sub in _subgraphs(node):
            _rename(sub, old, new)


def _unique(base: str, used: set[str]) -> str:
    name, n = base, 1
    while name in used:
        name, n = f"{base}_{n}", n + 1
    used.add(name)
    return name


def _static_dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """Dims of a tensor value (None for symbolic/unknown ones), or None if the rank is unknown."""
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _detect_layout(dims: list[int | None] | None, size: int, name: str) -> Layout:
    expected = f"[N,3,{size},{size}] (NCHW) or [N,{size},{size},3] (NHWC)"
    if dims is None or len(dims) != 4:
        raise ValueError(
            f"input {name!r} must be a 4-D image batch {expected}; got shape {dims}; "
            "this does not look like an ImageNet classifier"
        )

    def fits(spatial: list[int | None], channels: int | None) -> bool:
        return channels == 3 and all(d is None or d == size for d in spatial)

    nchw, nhwc = fits(dims[2:4], dims[1]), fits(dims[1:3], dims[3])
    if nchw and not nhwc:
        return "NCHW"
    if nhwc and not nchw:
        return "NHWC"
    shown = ["?" if d is None else d for d in dims]
    why = "is ambiguous" if nchw else "does not match"
    raise ValueError(
        f"input {name!r} has shape {shown}, which {why} {expected}; "
        "the channel axis must be static 3 and the spatial size must fit the preset's "
        f"input_size {size}"
    )


def _check_output(model: onnx.ModelProto, output_name: str, *, warn: bool = True) -> None:
    """Reject outputs that cannot be ImageNet class scores: not float, not [N, 1000].

    ``warn``: say so when the shape cannot be told statically (once: the build's check says it).
    """
    value = next(o for o in model.graph.output if o.name == output_name)
    if value.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(
            f"output {output_name!r} must be float32 class scores, got element type "
            f"{TensorProto.DataType.Name(value.type.tensor_type.elem_type)}"
        )
    dims = _static_dims(value)
    if dims is None or any(d is None for d in dims[1:]):
        # Exporters often leave output shapes unannotated; ask shape inference.
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception as exc:  # shape inference raises several unrelated types
            logger.debug("shape inference failed on the external model: %s", exc)
        else:
            value = next(o for o in inferred.graph.output if o.name == output_name)
            dims = _static_dims(value)
    if dims is None or any(d is None for d in dims[1:]):
        # Not provably wrong; the smoke run after preparation checks the real shape.
        if warn:
            logger.warning("cannot tell the shape of output %r statically (%s)", output_name, dims)
        return
    if len(dims) != 2 or dims[1] != NUM_CLASSES:
        raise ValueError(
            f"output {output_name!r} has shape {dims}, expected [N, {NUM_CLASSES}]: "
            "this does not look like an ImageNet-1k classifier"
        )


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise ValueError("the model imports no default-domain ONNX opset")


def check_external_onnx(model: onnx.ModelProto, preset: Preset) -> None:
    """Raise ValueError, as ``wrap_external_onnx`` would, when ``model`` is not shaped like an
    ImageNet classifier; reads the graph only (its weights may be left out), logs nothing."""
    _checked_classifier(model, preset, warn=False)


def _checked_classifier(
    m: onnx.ModelProto, preset: Preset, *, warn: bool
) -> tuple[onnx.ValueInfoProto, Layout]:
    """The image input and its layout of a graph shaped like an ImageNet classifier."""
    g = m.graph
    if _default_opset(m) < 7:
        # Before opset 7, Mul and Add did not broadcast the way the preprocessing needs.
        raise ValueError(f"opset {_default_opset(m)} is too old; need opset 7 or newer")

    initializer_names = {t.name for t in g.initializer}
    inputs = [v for v in g.input if v.name not in initializer_names]
    if len(inputs) != 1:
        raise ValueError(
            f"expected exactly one image input, found {len(inputs)}: {[v.name for v in inputs]}"
        )
    if len(g.output) != 1:
        raise ValueError(
            f"expected exactly one output (class scores), found {len(g.output)}: "
            f"{[v.name for v in g.output]}"
        )
    image_input = inputs[0]
    if image_input.type.tensor_type.elem_type != TensorProto.FLOAT:
        elem = TensorProto.DataType.Name(image_input.type.tensor_type.elem_type)
        raise ValueError(f"input {image_input.name!r} must be float32, got {elem}")
    layout = _detect_layout(_static_dims(image_input), preset.input_size, image_input.name)
    _check_output(m, g.output[0].name, warn=warn)
    return image_input, layout


def wrap_external_onnx(model: onnx.ModelProto, preset: Preset) -> onnx.ModelProto:
    """Wrap a user's float-input ImageNet classifier into the served uint8 graph contract.

    The model's single float input may be NCHW ``[N,3,S,S]`` or NHWC ``[N,S,S,3]`` (detected from
    its static dims); the preset's normalization is prepended, the batch dimension made dynamic,
    and a Softmax appended unless the graph already ends in one. The input is not modified.
    Raises ValueError when the model is not shaped like an ImageNet classifier.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    image_input, layout = _checked_classifier(m, preset, warn=True)

    used = _all_names(g)
    for reserved in (INPUT_NAME, OUTPUT_NAME):
        if reserved in used:
            _rename(g, reserved, _unique(f"{reserved}_original", used))
    body_input = image_input.name  # a live reference: reflects the renames above
    body_output = g.output[0].name

    prefix = _unique("framecast_preprocess", used)
    pre = preprocessing_nodes(
        preset, input_name=INPUT_NAME, output_name=body_input, layout=layout, prefix=prefix
    )
    body_nodes = list(g.node)
    producer = next((n for n in body_nodes if body_output in n.output), None)
    ends_in_softmax = (
        producer is not None
        and producer.op_type == "Softmax"
        and producer.domain in ("", "ai.onnx")
        and all(a.i in (1, -1) for a in producer.attribute if a.name == "axis")
    )
    tail: list[onnx.NodeProto] = []
    if ends_in_softmax:
        _rename(g, body_output, OUTPUT_NAME)
        body_nodes = list(g.node)
    else:
        tail.append(
            helper.make_node(
                "Softmax", [body_output], [OUTPUT_NAME], name=f"{prefix}/softmax", axis=1
            )
        )
    del g.node[:]
    g.node.extend([*pre, *body_nodes, *tail])

    images, probs = _io_value_infos(preset.input_size)
    kept_inputs = [v for v in g.input if v.name != body_input]
    del g.input[:]
    g.input.extend([images, *kept_inputs])
    del g.output[:]
    g.output.append(probs)
    # Intermediate annotations may pin the old static batch size, which would contradict the
    # now-dynamic batch; shape inference recomputes what is needed.
    del g.value_info[:]
    _set_metadata(m, preset, "external")
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"the wrapped model is not valid ONNX: {exc}") from exc
    logger.info(
        "wrapped external ONNX model (%s input, %s softmax)",
        layout,
        "kept its" if ends_in_softmax else "appended a",
    )
    return m
