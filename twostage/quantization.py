"""Batch-invariant int8: per-row activation quantisation for dynamically
quantised ONNX models.

onnxruntime's dynamic quantisation (``DynamicQuantizeLinear``) picks one
activation scale for the whole batch tensor, so a pair's score depends on
which other pairs share its batch (by up to 0.3 logits with the default
reranker). This rewrite quantises each row (token) with its own symmetric
scale instead, which makes every result independent of its batch-mates and
keeps the fast uint8 x int8 kernels: the zero point is a constant 128.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# This fusion assumes a per-tensor activation scale; it must stay off for rewritten graphs.
INCOMPATIBLE_OPTIMIZERS = ["MatMulIntegerToFloatFusion", "DynamicQuantizeMatMulFusion"]

_PREFIX = "twostage_row_quant_"


def has_dynamic_quantization(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "DynamicQuantizeLinear" for node in model.graph.node)


def _constant(graph: onnx.GraphProto, name: str, value) -> str:
    graph.initializer.append(numpy_helper.from_array(value, _PREFIX + name))
    return _PREFIX + name


def make_batch_invariant(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every DynamicQuantizeLinear with per-row symmetric quantisation (in place)."""
    graph = model.graph
    zero_point = _constant(graph, "zero_point", np.array(128, dtype=np.uint8))
    levels = _constant(graph, "levels", np.array(127.0, dtype=np.float32))
    tiny = _constant(graph, "tiny", np.array(1e-12, dtype=np.float32))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        last_axis = _constant(graph, "last_axis", np.array([-1], dtype=np.int64))

        def reduce(op, src, dst):
            return helper.make_node(op, [src, last_axis], [dst], keepdims=1)
    else:

        def reduce(op, src, dst):
            return helper.make_node(op, [src], [dst], axes=[-1], keepdims=1)

    if opset >= 13:
        flat = _constant(graph, "flat", np.array([-1], dtype=np.int64))

        def quantize_rows(x, scale, out, p):
            """One fused QuantizeLinear: view x as (rows, features) with a scale per row."""
            return [
                helper.make_node("Flatten", [x], [p + "rows"], axis=-1),
                helper.make_node("Reshape", [scale, flat], [p + "row_scale"]),
                helper.make_node("Shape", [p + "row_scale"], [p + "row_count"]),
                helper.make_node("Expand", [zero_point, p + "row_count"], [p + "row_zero_point"]),
                helper.make_node(
                    "QuantizeLinear", [p + "rows", p + "row_scale", p + "row_zero_point"], [p + "q_rows"], axis=0
                ),
                helper.make_node("Shape", [x], [p + "shape"]),
                helper.make_node("Reshape", [p + "q_rows", p + "shape"], [out]),
            ]
    else:  # QuantizeLinear has no per-axis form before opset 13: the same arithmetic, op by op
        offset = _constant(graph, "offset", np.array(128.0, dtype=np.float32))

        def quantize_rows(x, scale, out, p):
            return [
                helper.make_node("Div", [x, scale], [p + "scaled"]),
                helper.make_node("Round", [p + "scaled"], [p + "rounded"]),
                helper.make_node("Add", [p + "rounded", offset], [p + "shifted"]),
                helper.make_node("Cast", [p + "shifted"], [out], to=TensorProto.UINT8),
            ]

    nodes = []
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        (x,) = node.input
        quantized, scale, node_zero_point = node.output
        p = f"{_PREFIX}{len(nodes)}_"
        nodes += [
            helper.make_node("Abs", [x], [p + "abs"]),
            reduce("ReduceMax", p + "abs", p + "absmax"),
            helper.make_node("Div", [p + "absmax", levels], [p + "scale"]),
            helper.make_node("Max", [p + "scale", tiny], [scale]),  # an all-zero row keeps a finite scale
            *quantize_rows(x, scale, quantized, p),
            helper.make_node("Identity", [zero_point], [node_zero_point]),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    # Shapes recorded for the old per-tensor scales are now wrong; let the runtime infer them.
    kept = [info for info in graph.value_info if not info.name.endswith(("_scale", "_scales_mul:0"))]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model
