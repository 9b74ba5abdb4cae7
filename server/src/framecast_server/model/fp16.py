"""Convert the served fp32 ONNX graph to an fp16 body with unchanged uint8-in / fp32-out I/O.

TensorRT 10 with a strongly typed network (and every TensorRT 11 network) runs each layer in the
type the graph gives it; there is no "allow fp16" builder flag any more. The precision therefore
has to be in the ONNX graph itself, which is what this module does.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings

import onnx
from onnx import TensorProto
from onnxconverter_common import float16

logger = logging.getLogger(__name__)

# Operators kept in fp32. Softmax exponentiates: in fp16 its sums lose the small probabilities
# and top-k order among near-ties, and the output is fp32 anyway, so it costs nothing to keep.
FP32_OPS = ("Softmax",)

# Bump when this recipe changes what it produces; built engines are keyed by it.
RECIPE_VERSION = 2


def converter_version() -> str:
    """Identifies the conversion for cache keys: this recipe and the converter library's version."""
    library = importlib.metadata.version("onnxconverter-common")
    return f"{RECIPE_VERSION}+onnxconverter-common-{library}"


def _retarget_float_casts(model: onnx.ModelProto) -> int:
    """Make Cast nodes that feed the fp16 body produce fp16; return how many were changed.

    The converter rewrites tensor types but not Cast's integer ``to`` attribute, so the graph's
    leading ``Cast(uint8 -> float)`` would still produce fp32 into fp16 nodes: ONNX type
    inference and ONNX Runtime reject that, and TensorRT would run the first layers in fp32.
    A Cast whose output the converter declared fp16 must cast to fp16.
    """
    fp16_values = {
        vi.name
        for vi in model.graph.value_info
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16
    }
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Cast" or node.output[0] not in fp16_values:
            continue
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
                changed += 1
    return changed


def _restore_fp32_outputs(model: onnx.ModelProto, fp32_outputs: set[str]) -> int:
    """Undo the converter's ``Cast(to=fp16)`` after a blocked op that produces a graph output.

    With ``keep_io_types`` the converter still casts a blocked op's fp32 result (Softmax here)
    back to fp16 when it is the graph output, and declares the output fp16. The op's own fp32
    result is what the output should be: drop the Cast and let the op write the output.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    restored = 0
    for output in model.graph.output:
        cast = producers.get(output.name)
        if output.name not in fp32_outputs or cast is None or cast.op_type != "Cast":
            continue
        if [a.i for a in cast.attribute if a.name == "to"] != [TensorProto.FLOAT16]:
            continue
        source = producers.get(cast.input[0])
        if source is None:
            continue
        source.output[list(source.output).index(cast.input[0])] = output.name
        model.graph.node.remove(cast)
        stale = [vi for vi in model.graph.value_info if vi.name in (cast.input[0], output.name)]
        for vi in stale:
            model.graph.value_info.remove(vi)
        output.type.tensor_type.elem_type = TensorProto.FLOAT
        restored += 1
    return restored


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return an fp16 copy of ``model`` whose inputs and outputs keep their types.

    The uint8 ``images`` input stays uint8 (its Cast now goes straight to fp16), the fp32
    ``probabilities`` output stays fp32, and every float initializer and intermediate tensor
    becomes fp16 except around the ops in ``FP32_OPS`` (Softmax), which run in fp32 after a
    Cast. ``model`` itself is not modified.
    Raises ``ValueError`` if the result fails ``onnx.checker`` (full check, with types).
    """
    source = onnx.ModelProto()
    source.CopyFrom(model)
    with warnings.catch_warnings(record=True) as caught:
        # The converter warns once per weight it clamps into fp16's range; log a summary
        # instead of dozens of warnings (and instead of failing -W error test runs).
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            source, keep_io_types=True, op_block_list=list(FP32_OPS)
        )
    if caught:
        logger.info(
            "fp16 conversion clamped out-of-range values in %d tensors (first: %s)",
            len(caught),
            caught[0].message,
        )
    if not isinstance(converted, onnx.ModelProto):
        raise TypeError(f"float16 converter returned {type(converted).__name__}")
    fp32_outputs = {
        o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT
    }
    _restore_fp32_outputs(converted, fp32_outputs)
    retargeted = _retarget_float_casts(converted)
    logger.debug("fp16 conversion retargeted %d Cast nodes to fp16", retargeted)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"fp16 conversion produced an invalid model: {exc}") from exc
    except onnx.shape_inference.InferenceError as exc:
        raise ValueError(f"fp16 conversion produced an ill-typed model: {exc}") from exc
    return converted
