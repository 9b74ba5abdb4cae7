"""Convert the served fp32 ONNX graph to an fp16 body with unchanged uint8-in / fp32-out I/O.

TensorRT 10 with a strongly typed network (and every TensorRT 11 network) runs each layer in the
type the graph gives it; there is no "allow fp16" builder flag any more. The precision therefore
has to be in the ONNX graph itself, which is what this module does.
"""

from __future__ import annotations

import logging
import warnings

import onnx
from onnx import TensorProto
from onnxconverter_common import float16

logger = logging.getLogger(__name__)


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


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return an fp16 copy of ``model`` whose inputs and outputs keep their types.

    The uint8 ``images`` input stays uint8 (its Cast now goes straight to fp16), the fp32
    ``probabilities`` output stays fp32 (the converter appends a Cast), and every float
    initializer and intermediate tensor becomes fp16. ``model`` itself is not modified.
    Raises ``ValueError`` if the result fails ``onnx.checker`` (full check, with types).
    """
    source = onnx.ModelProto()
    source.CopyFrom(model)
    with warnings.catch_warnings(record=True) as caught:
        # The converter warns once per weight it clamps into fp16's range; log a summary
        # instead of dozens of warnings (and instead of failing -W error test runs).
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(source, keep_io_types=True)
    if caught:
        logger.info(
            "fp16 conversion clamped out-of-range values in %d tensors (first: %s)",
            len(caught),
            caught[0].message,
        )
    if not isinstance(converted, onnx.ModelProto):
        raise TypeError(f"float16 converter returned {type(converted).__name__}")
    retargeted = _retarget_float_casts(converted)
    logger.debug("fp16 conversion retargeted %d Cast nodes to fp16", retargeted)
    try:
        onnx.checker.check_model(converted, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"fp16 conversion produced an invalid model: {exc}") from exc
    except onnx.shape_inference.InferenceError as exc:
        raise ValueError(f"fp16 conversion produced an ill-typed model: {exc}") from exc
    return converted
