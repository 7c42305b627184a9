"""Execution plans on the real int8 default models: every plan a server can choose gives an item the same
result, bit for bit, alone and in any batch; auto chooses by measuring and keeps the choice per model and host."""

import itertools

import numpy as np
import pytest

from recall_server.embedder import Embedder
from rerank_server.cross_encoder import CrossEncoder
from twostage import execution_plan
from twostage.batching import BatchPolicy
from twostage.config import RuntimeSettings
from twostage.corpus import DEMO_CORPUS, document_text, read_corpus
from twostage.errors import ConfigError

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."
# Two sessions side by side even on a one-core host; a cap of 3 puts items of different lengths together.
PLANS = [("single", None), ("sessions", None), ("rows", 3), ("rows", None)]


def documents(n: int) -> list[str]:
    texts = [document_text(d) for d in itertools.islice(read_corpus(DEMO_CORPUS), n - 2)]
    return [*texts, "vitamin B12", "homocysteine " * 3]  # short ones, so batches pad


def batchings(n: int) -> list[list[int]]:
    """Orders and company an item may get: all together, reversed, interleaved, pairs, a lone long and short."""
    rng = np.random.default_rng(7)
    return [list(range(n)), [int(i) for i in rng.permutation(n)], [0, n - 1], [n - 1, 0, 1]]


def use_plan(model, name: str, cap: int | None) -> None:
    settings = RuntimeSettings(intra_op_threads=2, execution_plan=name)
    model.plan = execution_plan.build(name, model.model_file, settings, cap)


@pytest.fixture(scope="module")
def reranker(models):
    return CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="single"), 256)


@pytest.fixture(scope="module")
def embedder(models):
    return Embedder(models["bge-small-en"], RuntimeSettings(execution_plan="single"), 256)


@pytest.mark.parametrize(("name", "cap"), PLANS)
def test_a_pairs_score_is_the_same_alone_and_in_any_batch(reranker, name, cap):
    use_plan(reranker, name, cap)
    pairs, _ = reranker.encode(QUERY, documents(6))
    assert len({p.length for p in pairs}) >= 3
    alone = np.array([reranker.score([p])[0] for p in pairs])
    for order in batchings(len(pairs)):
        np.testing.assert_array_equal(reranker.score([pairs[i] for i in order]), alone[order])


@pytest.mark.parametrize(("name", "cap"), PLANS)
def test_a_texts_vector_is_the_same_alone_and_in_any_batch(embedder, name, cap):
    use_plan(embedder, name, cap)
    encoded = embedder.encode(documents(6), is_query=False)
    assert len({e.length for e in encoded}) >= 3
    alone = np.concatenate([embedder.embed([e]) for e in encoded])
    for order in batchings(len(encoded)):
        np.testing.assert_array_equal(embedder.embed([encoded[i] for i in order]), alone[order])


def test_the_stock_graph_in_batches_is_not_batch_invariant(reranker):
    """What the plans avoid, so the tests above can fail: batched, a pair's score moves with its batch-mates."""
    reranker.plan = execution_plan.build("batched", reranker.model_file, RuntimeSettings(batch_invariant=False))
    pairs, _ = reranker.encode(QUERY, documents(6))
    alone = np.array([reranker.score([p])[0] for p in pairs])
    assert not np.array_equal(reranker.score(pairs), alone)


def test_plans_of_one_graph_give_the_same_scores(reranker):
    """single and sessions run the stock graph, so a replica's plan does not change its scores (nor may the
    score cache's identity)."""
    pairs, _ = reranker.encode(QUERY, documents(6))
    use_plan(reranker, "single", None)
    single = reranker.score(pairs)
    use_plan(reranker, "sessions", None)
    np.testing.assert_array_equal(reranker.score(pairs), single)


def test_sessions_take_batches_n_fold_and_the_rewrite_its_cap():
    policy = BatchPolicy(max_batch_size=32, max_batch_tokens=1024, bulk_max_batch_tokens=512)
    sessions = execution_plan.SessionsPlan([object(), object(), object()])
    assert (sessions.policy(policy).max_batch_tokens, sessions.policy(policy).bulk_max_batch_tokens) == (3072, 1536)
    assert execution_plan.RowsPlan([object()], 4).policy(policy).max_batch_size == 4
    assert execution_plan.RowsPlan([object()], None).policy(policy).max_batch_size == 32
    sessions.close()


def test_auto_measures_once_per_model_and_host_then_reuses_the_choice(models, tmp_path, caplog):
    cache = execution_plan.PlanCache(tmp_path)
    settings = RuntimeSettings(execution_plan="auto")
    model = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="single"), 256)
    load = lambda: execution_plan.load(model.model_file, settings, model._call, model.typical_pairs,
                                       model.digest, cache)
    with caplog.at_level("INFO", logger="twostage.execution_plan"):
        first = load()
    assert first.source == "calibrated" and first.name in execution_plan.PLAN_NAMES
    # Every candidate was measured on this host, and the fastest chosen.
    assert "single" in first.rates and any(label.startswith("rows") for label in first.rates)
    assert first.rates[first.label] == max(first.rates.values())
    assert f"execution plan {first.label}" in caplog.text  # the startup log says which
    (kept,) = tmp_path.glob("*.json")
    again = load()
    assert (again.source, again.label, again.rates) == ("cached", first.label, first.rates)
    # Another host (or model, or onnxruntime) does not read this host's choice.
    import json

    key = json.loads(kept.read_text())["key"]
    assert key["model"] == model.digest and cache.get(key) is not None and cache.get({**key, "cpu": "another processor"}) is None


def test_a_forced_plan_is_not_measured_and_batch_invariant_false_runs_whole_batches(models, tmp_path):
    cache = execution_plan.PlanCache(tmp_path)
    model = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(execution_plan="rows"), 256)
    assert (model.plan.name, model.plan.source, model.plan.graph) == ("rows", "forced", "per-row")
    off = execution_plan.load(model.model_file, RuntimeSettings(batch_invariant=False), model._call,
                              model.typical_pairs, model.digest, cache)
    assert (off.name, off.invariant) == ("batched", False)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="batch_invariant=false"):
        execution_plan.load(model.model_file, RuntimeSettings(batch_invariant=False, execution_plan="single"),
                            model._call, model.typical_pairs, model.digest, cache)


def test_sessions_return_results_in_the_batch_order_and_a_failing_item_fails_the_batch():
    from types import SimpleNamespace

    plan = execution_plan.SessionsPlan(["first", "second"])
    items = [SimpleNamespace(length=n) for n in (3, 9, 1, 7, 5)]

    def call(session, batch):
        if batch[0].length == 0:
            raise RuntimeError("the model failed")
        return np.array([batch[0].length], dtype=np.float32)

    np.testing.assert_array_equal(plan.run(items, call), [3, 9, 1, 7, 5])
    with pytest.raises(RuntimeError, match="the model failed"):
        plan.run([*items, SimpleNamespace(length=0)], call)
    np.testing.assert_array_equal(plan.run(items[:2], call), [3, 9])  # the next batch runs as usual
    plan.close()
