"""Batch-invariant int8: per-row activation quantisation for dynamically
quantised ONNX models.

onnxruntime's dynamic quantisation (``DynamicQuantizeLinear``) picks one
activation scale for the whole batch tensor, so a pair's score depends on
which other pairs share its batch (by up to 0.3 logits with the default
reranker). This rewrite quantises each row (token) with its own symmetric
scale instead, which makes every result independent of its batch-mates.

It keeps onnxruntime's fused int8 kernel: each row is divided by its largest
magnitude, so one scalar scale (1/127, zero point 128) quantises every row the
same way; ``MatMulIntegerToFloat`` multiplies with that scalar scale, and its
output is multiplied back by each row's magnitude. The arithmetic is per-row
symmetric quantisation; only the kernels differ. (Quantising with a per-row
scale directly, as this module first did, ruled the fused kernel out and cost
about 18% more throughput on CPU.)
"""

import collections

import numpy as np
import onnx
from onnx import helper, numpy_helper

from twostage.errors import InvalidArgument

_PREFIX = "twostage_row_quant_"


def has_dynamic_quantization(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "DynamicQuantizeLinear" for node in model.graph.node)


def _constant(graph: onnx.GraphProto, name: str, value) -> str:
    graph.initializer.append(numpy_helper.from_array(value, _PREFIX + name))
    return _PREFIX + name


def _unsupported(what: str) -> InvalidArgument:
    return InvalidArgument(f"{what}, which the batch-invariant rewrite does not handle; serve this model with "
                           "batch_invariant=false")


def _fused_matmuls(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> tuple[dict[int, tuple], set[int]]:
    """For every DynamicQuantizeLinear, the MatMulInteger -> Cast -> Mul(activation scale x weight scale)
    chains that read it, by node position: ({MatMulInteger: (its inputs, the weight scale, the Mul's output)},
    positions of the nodes the rewrite replaces: the Casts, the Muls and the scale products). Any other use
    of a quantised activation, its scale or its zero point would keep the per-tensor meaning, so it is refused."""
    consumers, producer = collections.defaultdict(list), {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers[name].append(i)
        for name in node.output:
            producer[name] = i
    found, replaced, scale_products = {}, set(), set()
    for dynamic in (node for node in nodes if node.op_type == "DynamicQuantizeLinear"):
        quantized, scale, zero_point = dynamic.output
        if read_out := set(dynamic.output) & graph_outputs:
            raise _unsupported(f"{dynamic.name or quantized}: the graph outputs {', '.join(sorted(read_out))}")
        for i in consumers[quantized]:
            node = nodes[i]
            casts = consumers[node.output[0]] if node.op_type == "MatMulInteger" else []
            muls = consumers[nodes[casts[0]].output[0]] if len(casts) == 1 and nodes[casts[0]].op_type == "Cast" else []
            mul = nodes[muls[0]] if len(muls) == 1 and nodes[muls[0]].op_type == "Mul" else None
            scale_mul = producer.get(mul.input[1]) if mul is not None else None
            if (node.input[0] != quantized or scale_mul is None or nodes[scale_mul].op_type != "Mul"
                    or scale not in nodes[scale_mul].input):
                raise _unsupported(f"{node.name or node.output[0]}: {node.op_type} reads a dynamically quantised "
                                   "activation outside the MatMulInteger -> Cast -> Mul(scales) pattern")
            weight_scale = next(name for name in nodes[scale_mul].input if name != scale)
            found[i] = (list(node.input), weight_scale, mul.output[0])
            replaced |= {casts[0], muls[0], scale_mul}
            scale_products.add(scale_mul)
        for name in (scale, zero_point):
            if other := [i for i in consumers[name] if i not in replaced and i not in found]:
                raise _unsupported(f"{nodes[other[0]].name or name}: {nodes[other[0]].op_type} reads {name}")
    for i in scale_products:
        if any(c not in replaced for c in consumers[nodes[i].output[0]]):
            raise _unsupported(f"{nodes[i].name or nodes[i].output[0]}: a scale product is read elsewhere")
    return found, replaced


def make_batch_invariant(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every DynamicQuantizeLinear with per-row symmetric quantisation (in place)."""
    graph = model.graph
    zero_point = _constant(graph, "zero_point", np.array(128, dtype=np.uint8))
    unit_scale = _constant(graph, "unit_scale", np.array(1 / 127, dtype=np.float32))
    tiny = _constant(graph, "tiny", np.array(1e-30, dtype=np.float32))  # an all-zero row stays finite
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        last_axis = _constant(graph, "last_axis", np.array([-1], dtype=np.int64))

        def row_max(src, dst):
            return helper.make_node("ReduceMax", [src, last_axis], [dst], keepdims=1)
    else:

        def row_max(src, dst):
            return helper.make_node("ReduceMax", [src], [dst], axes=[-1], keepdims=1)

    matmuls, replaced = _fused_matmuls(list(graph.node), {output.name for output in graph.output})
    magnitude: dict[str, str] = {}  # quantized activation -> its rows' largest magnitudes
    nodes = []
    for position, node in enumerate(list(graph.node)):
        if position in replaced:
            continue
        if node.op_type == "DynamicQuantizeLinear":
            # Its scale and zero point outputs are read by nothing once the products are replaced.
            (x,) = node.input
            quantized = node.output[0]
            p = f"{_PREFIX}{len(nodes)}_"
            nodes += [
                helper.make_node("Abs", [x], [p + "abs"]),
                row_max(p + "abs", p + "row_max"),
                helper.make_node("Max", [p + "row_max", tiny], [p + "magnitude"]),
                helper.make_node("Div", [x, p + "magnitude"], [p + "unit_rows"]),
                helper.make_node("QuantizeLinear", [p + "unit_rows", unit_scale, zero_point], [quantized]),
            ]
            magnitude[quantized] = p + "magnitude"
        elif position in matmuls:
            (a, b, _, b_zero_point), weight_scale, output = matmuls[position]
            p = f"{_PREFIX}{len(nodes)}_"
            nodes += [
                helper.make_node("MatMulIntegerToFloat", [a, b, unit_scale, weight_scale, zero_point, b_zero_point],
                                 [p + "unit_product"], domain="com.microsoft"),
                helper.make_node("Mul", [p + "unit_product", magnitude[a]], [output]),
            ]
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    # Shapes recorded for the old per-tensor scales are now wrong; let the runtime infer them.
    kept = [info for info in graph.value_info if not info.name.endswith(("_scale", "_scales_mul:0"))]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return model
