"""Per-row activation quantisation: the rewrite, on tiny graphs and the real int8 reranker (every plan's
invariance: test_execution_plan)."""

import itertools

import numpy as np
import pytest

from rerank_server.cross_encoder import CrossEncoder
from twostage.config import RuntimeSettings
from twostage.corpus import DEMO_CORPUS, document_text, read_corpus

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."


def documents(n: int) -> list[str]:
    return [document_text(d) for d in itertools.islice(read_corpus(DEMO_CORPUS), n)]


@pytest.mark.slow
def test_rewrite_stays_close_to_the_shipped_quantisation(models):
    invariant = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="rows"), 256)
    shipped = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="single"), 256)
    pairs, _ = invariant.encode(QUERY, documents(10))
    a = np.array([invariant.score([p])[0] for p in pairs])
    b = np.array([shipped.score([p])[0] for p in pairs])
    assert np.corrcoef(a, b)[0, 1] > 0.97
    assert np.argmax(a) == np.argmax(b)


def _tiny_dynamic_matmul(extra_scale_reader: bool):
    """x -> DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x scale x weight scale), as quantize_dynamic
    writes it; optionally the activation scale is also a graph output (a use the rewrite cannot keep)."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.arange(12, dtype=np.int8).reshape(4, 3), "w_q")
    weight_scale = numpy_helper.from_array(np.array(0.05, dtype=np.float32), "w_scale")
    weight_zero = numpy_helper.from_array(np.array(0, dtype=np.int8), "w_zero")
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["x_q", "x_scale", "x_zero"]),
        helper.make_node("MatMulInteger", ["x_q", "w_q", "x_zero", "w_zero"], ["y_int"]),
        helper.make_node("Cast", ["y_int"], ["y_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x_scale", "w_scale"], ["scales"]),
        helper.make_node("Mul", ["y_float", "scales"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if extra_scale_reader:
        outputs.append(helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              outputs, [weights, weight_scale, weight_zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def test_rows_of_a_rewritten_matmul_do_not_depend_on_each_other():
    import onnxruntime

    from twostage.quantization import make_batch_invariant

    session = onnxruntime.InferenceSession(make_batch_invariant(_tiny_dynamic_matmul(False)).SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    scales = np.array([[1], [100], [0.01], [5], [0]], dtype=np.float32)  # the last row is all zeros
    rows = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32) * scales
    together = session.run(None, {"x": rows})[0]
    alone = np.concatenate([session.run(None, {"x": row[None, :]})[0] for row in rows])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_allclose(together, rows @ (np.arange(12).reshape(4, 3) * 0.05), rtol=0.05, atol=0.05)


def test_a_quantised_activation_read_outside_the_pattern_is_refused():
    from twostage.errors import InvalidArgument
    from twostage.quantization import make_batch_invariant

    with pytest.raises(InvalidArgument, match="serve this model with batch_invariant=false"):
        make_batch_invariant(_tiny_dynamic_matmul(True))
