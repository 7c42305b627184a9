"""Metrics against values worked out by hand."""

import math

import pytest

from twostage.evaluation.metrics import evaluate, mrr_at, ndcg_at, recall_at

JUDGED = {"a": 2, "b": 1, "c": 0}  # graded; c is judged not relevant


def test_ndcg_with_graded_relevance():
    # ranking b, x, a: DCG = 1/log2(2) + 0 + 2/log2(4) = 1 + 1 = 2; IDCG = 2/1 + 1/log2(3)
    assert ndcg_at(["b", "x", "a"], JUDGED, 10) == pytest.approx(2 / (2 + 1 / math.log2(3)))
    assert ndcg_at(["a", "b"], JUDGED, 10) == pytest.approx(1.0)
    assert ndcg_at(["x", "a"], JUDGED, 1) == 0.0  # the cutoff applies


def test_mrr_and_recall():
    assert mrr_at(["c", "x", "b"], JUDGED, 10) == pytest.approx(1 / 3)  # c has grade 0: not a hit
    assert mrr_at(["c", "x", "b"], JUDGED, 2) == 0.0
    assert recall_at(["b", "c", "x"], JUDGED, 10) == pytest.approx(0.5)
    assert recall_at(["b", "a"], JUDGED, 1) == pytest.approx(0.5)


def test_evaluate_averages_judged_queries_only():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"z": 0}}
    result = evaluate({"q1": ["a"], "q2": ["x", "b"], "q3": ["z"]}, qrels, [10])
    assert result["mrr@10"] == pytest.approx((1 + 0.5) / 2)
    assert result["recall@10"] == pytest.approx(1.0)
    assert result["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=1e-4)
