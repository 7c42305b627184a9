"""Every score transformation on its own: recall fusion, the final fusion, calibration, the final order, and the
fusion methods as settings, JSON and protos name them."""

import json
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest

from gateway.config import GatewaySettings
from gateway.http.app import decode_body
from gateway.http.native import SearchBody
from recall_server.config import RecallSettings
from twostage.convert import fusion_from_proto, fusion_to_proto, hybrid_fusion_from_proto, hybrid_fusion_to_proto
from twostage.scoring import (
    DEFAULT_CALIBRATION,
    RRF_K,
    Calibration,
    Fusion,
    HybridFusion,
    fuse_final,
    fuse_recall,
    mean_calibration,
    rank_final,
    recall_part,
    relevance,
    standardised,
)
from twostage.v1 import gateway_pb2, recall_pb2


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Recall fusion


def test_standardised_has_mean_zero_and_unit_spread_or_no_preference():
    assert standardised(np.array([1.0, 2.0, 3.0])) == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert standardised(np.array([4.0, 4.0])).tolist() == [0.0, 0.0]
    # Mean 5, standard deviation 2: every step exact in binary, so the golden values compare with ==.
    assert standardised(np.array([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])).tolist() == [
        -1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0]


def test_zscore_recall_fusion_weighs_standardised_scores():
    # dense z: [1, -1]; lexical z: [-1, 1]
    fused = fuse_recall(["a", "b"], [0.8, 0.6], [2.0, 10.0], HybridFusion.ZSCORE, 0.7)
    assert fused == [("a", pytest.approx(0.7 - 0.3)), ("b", pytest.approx(-0.7 + 0.3))]
    assert fuse_recall(["a", "b"], [0.8, 0.6], [2.0, 10.0], HybridFusion.ZSCORE, 0.3)[0][0] == "b"


def test_rrf_recall_fusion_adds_weighted_reciprocal_ranks_and_nothing_for_no_lexical_match():
    fused = dict(fuse_recall(["a", "b", "c"], [0.9, 0.7, 0.8], [5.0, 9.0, 0.0], HybridFusion.RRF, 0.6))
    # dense ranks: a 1, c 2, b 3; lexical ranks: b 1, a 2; c matched no query term.
    assert fused == pytest.approx({"a": 0.6 / (RRF_K + 1) + 0.4 / (RRF_K + 2),
                                   "b": 0.6 / (RRF_K + 3) + 0.4 / (RRF_K + 1),
                                   "c": 0.6 / (RRF_K + 2)})


def test_recall_fusion_orders_best_first_and_breaks_ties_by_the_cosine():
    fused = fuse_recall(["a", "b", "c"], [0.5, 0.9, 0.7], [1.0, 1.0, 1.0], HybridFusion.ZSCORE, 0.0)
    assert [key for key, _ in fused] == ["b", "c", "a"]  # the lexical part alone ties them all
    assert fuse_recall([], [], [], HybridFusion.RRF, 0.5) == []


@pytest.mark.parametrize("method", list(HybridFusion))
def test_fusing_two_shards_candidates_together_equals_fusing_the_one_list(method):
    rng = np.random.default_rng(3)
    keys = [f"d{i}" for i in range(40)]
    dense, lexical = rng.uniform(0.3, 0.9, 40), np.where(rng.random(40) < 0.3, 0.0, rng.uniform(1, 20, 40))
    one_index = fuse_recall(keys, dense, lexical, method, 0.7)
    shard = rng.random(40) < 0.5  # each candidate lives on one of two shards; the gateway holds their union
    union = [i for i in range(40) if shard[i]] + [i for i in range(40) if not shard[i]]
    sharded = fuse_recall([keys[i] for i in union], dense[union], lexical[union], method, 0.7)
    assert [key for key, _ in sharded] == [key for key, _ in one_index]
    # Summed in another order, a mean may differ in its last bit.
    assert [score for _, score in sharded] == pytest.approx([score for _, score in one_index])


def test_unknown_recall_fusion_is_an_error():
    with pytest.raises(ValueError):
        fuse_recall(["a"], [1.0], [1.0], "max", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^unknown hybrid fusion 'max'$"):
        fuse_recall(["a"], [1.0], [1.0], "max", 0.5)  # type: ignore[arg-type]


# Final fusion


def test_none_is_the_rerank_score():
    assert fuse_final([0.9, 0.8], [1.0, 3.0], "none", 0.5) == [1.0, 3.0]


def test_linear_mixes_per_query_zscores():
    # recall z: [1, -1]; rerank z: [-1, 1]
    assert fuse_final([0.9, 0.7], [2.0, 4.0], "linear", 0.7) == pytest.approx([0.7 * -1 + 0.3 * 1, 0.7 * 1 + 0.3 * -1])
    assert fuse_final([0.9, 0.7], [2.0, 4.0], "linear", 1.0) == pytest.approx([-1.0, 1.0])
    assert fuse_final([0.5, 0.5], [1.0, 1.0], "linear", 0.5) == [0.0, 0.0]  # no spread, no preference


def test_rrf_ranks_recall_by_position_whatever_its_scores_say():
    # The candidates arrive in recall order: the recall rank is the position, not the rank of recall_scores.
    scores = fuse_final([-7.0, 7.0, 1.0], [0.5, 4.0, 2.0], "rrf", 0.0)
    assert scores == [1 / (RRF_K + 3) + 1 / (RRF_K + 1), 1 / (RRF_K + 1) + 1 / (RRF_K + 2),
                      1 / (RRF_K + 2) + 1 / (RRF_K + 3)]


def test_rrf_adds_reciprocal_ranks():
    scores = fuse_final([0.9, 0.8, 0.7], [0.1, 5.0, 2.0], "rrf", 0.0)
    # rerank ranks: [3, 1, 2]; recall ranks: [1, 2, 3]
    expected = [1 / (RRF_K + 3) + 1 / (RRF_K + 1), 1 / (RRF_K + 1) + 1 / (RRF_K + 2), 1 / (RRF_K + 2) + 1 / (RRF_K + 3)]
    assert scores == pytest.approx(expected)


def test_calibrated_is_the_sigmoid_of_the_logit_and_the_calibrated_recall_scores():
    calibration = Calibration(scale=100.0, center=0.7, lexical_scale=0.5, lexical_center=10.0)
    dense_only = fuse_final([0.75], [2.0], Fusion.CALIBRATED, 0.5, calibration)
    assert dense_only == pytest.approx([sigmoid(0.5 * 2.0 + 0.5 * 100 * 0.05)])
    with_bm25 = fuse_final([0.75], [2.0], Fusion.CALIBRATED, 0.5, calibration, [14.0])
    assert with_bm25 == pytest.approx([sigmoid(0.5 * 2.0 + 0.5 * (100 * 0.05 + 0.5 * 4.0))])


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError):
        fuse_final([1.0], [1.0], "max", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^unknown fusion 'max'$"):
        fuse_final([1.0], [1.0], "max", 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", [*Fusion, *(f.value for f in Fusion), "max"])
def test_nothing_reranked_fuses_to_nothing(method):
    assert fuse_final([], [], method, 0.5) == []


# Calibration


def test_relevance_is_the_sigmoid_of_the_logit_and_stays_finite():
    assert relevance(0.0) == 0.5
    assert relevance(2.0) == pytest.approx(sigmoid(2.0))
    assert relevance(-1000.0) >= 0 and relevance(1000.0) <= 1  # clipped: no overflow


def test_logits_are_clipped_at_plus_and_minus_sixty():
    # Within the clip the sigmoid is exact to its last bits (numpy's exp and libm's may differ in the last one);
    # beyond it, a logit scores as ±60 does.
    assert relevance(-45.0) == pytest.approx(1 / (1 + math.exp(45.0)), rel=1e-15, abs=0)
    assert relevance(-1000.0) == pytest.approx(1 / (1 + math.exp(60.0)), rel=1e-15, abs=0)
    assert relevance(-60.0) == relevance(-1000.0) > 0
    assert relevance(1000.0) == 1.0


def test_recall_part_is_the_calibrated_score_without_rerank_evidence():
    assert recall_part(0.72, 0.5) == pytest.approx(0.5)  # the default centre is neutral
    assert recall_part(0.8, 0.5, DEFAULT_CALIBRATION, 15.0) == pytest.approx(
        sigmoid(0.5 * (100 * 0.08 + 0.5 * 2.0)))
    assert recall_part(0.8, 0.5) == fuse_final([0.8], [0.0], Fusion.CALIBRATED, 0.5)[0]


def test_mean_calibration_averages_each_constant_over_the_shards():
    assert mean_calibration([]) is None
    one = Calibration(90.0, 0.7, 0.4, 12.0)
    assert mean_calibration([one]) is one
    assert mean_calibration([one, Calibration(110.0, 0.8, 0.6, 14.0)]) == Calibration(
        100.0, pytest.approx(0.75), pytest.approx(0.5), 13.0)


# The final order


@dataclass(frozen=True)
class Candidate:
    score: float
    dense_score: float
    lexical_score: float = 0.0


def candidates(n: int) -> list[Candidate]:
    return [Candidate(0.9 - 0.01 * i, 0.9 - 0.01 * i, 20.0 - i) for i in range(n)]


@pytest.mark.parametrize("fusion", list(Fusion))
@pytest.mark.parametrize("lexical", [False, True])
def test_tail_scores_never_rise_with_rank(fusion, lexical):
    rng = random.Random(7)
    for _ in range(50):
        n = rng.randint(1, 30)
        pool = [Candidate(rng.uniform(-1, 1), rng.uniform(0, 1), rng.uniform(0, 30)) for _ in range(n)]
        pool.sort(key=lambda c: -c.score)
        reranked = {i: rng.uniform(-10, 10) for i in rng.sample(range(n), rng.randint(0, n))}
        ranked = rank_final(pool, reranked, fusion, rng.random(), DEFAULT_CALIBRATION, lexical)
        scores = [score for _, score in ranked]
        assert scores == sorted(scores, reverse=True)
        assert sorted(i for i, _ in ranked) == list(range(n))
        assert [i in reranked for i, _ in ranked] == [True] * len(reranked) + [False] * (n - len(reranked))
        if reranked and len(reranked) < n:  # not reranked: strictly below every reranked candidate
            assert scores[len(reranked) - 1] > scores[len(reranked)]


def test_reranked_candidates_lead_by_fused_score_and_the_rest_keep_recall_order():
    pool = candidates(6)
    rerank = {0: -1.0, 2: 3.0, 3: 0.5}
    ranked = rank_final(pool, rerank, Fusion.NONE, 0.7)
    assert ranked[:3] == [(2, 3.0), (3, 0.5), (0, -1.0)]
    assert [i for i, _ in ranked[3:]] == [1, 4, 5]
    # Relative fusions give the rest their recall score, capped below the one before it.
    below = [-1.0]
    for _ in range(3):
        below.append(math.nextafter(below[-1], -math.inf))
    assert [score for _, score in ranked[3:]] == below[1:]
    fused = fuse_final([pool[i].score for i in (0, 2, 3)], [-1.0, 3.0, 0.5], Fusion.LINEAR, 0.7)
    linear = rank_final(pool, rerank, Fusion.LINEAR, 0.7)
    assert dict(linear[:3]) == dict(zip((0, 2, 3), fused))


def test_calibrated_tail_scores_are_the_recall_part_where_it_lies_below_the_reranked():
    pool = candidates(4)
    ranked = rank_final(pool, {0: 8.0}, Fusion.CALIBRATED, 0.5, DEFAULT_CALIBRATION, lexical=True)
    assert ranked[0] == (0, pytest.approx(sigmoid(0.5 * 8.0 + 0.5 * (100 * (0.9 - 0.72) + 0.5 * (20 - 13)))))
    for i, score in ranked[1:]:
        assert score == recall_part(pool[i].dense_score, 0.5, DEFAULT_CALIBRATION, pool[i].lexical_score)
    # Nothing reranked: the recall order's own scores for a relative fusion.
    assert rank_final(pool, {}, Fusion.RRF, 0.5) == [(i, c.score) for i, c in enumerate(pool)]


# Golden final orders. The recall order's score differs from the cosine; recall and rerank scores each have
# mean and standard deviation exact in binary (recall: mean 0, deviations ±7, ±1, spread 5; rerank: mean 2,
# deviations -1, -7, 7, 1, spread 5), so every relative score below is exact and compares with ==.
GOLDEN_POOL = [Candidate(7.0, 0.5, 14.0), Candidate(1.0, 0.75, 10.0), Candidate(-1.0, 0.25, 12.0),
               Candidate(-7.0, 0.625, 6.0), Candidate(-8.0, 0.375, 16.0), Candidate(-9.0, 0.125, 8.0)]
GOLDEN_RERANK = {0: 1.0, 1: -5.0, 2: 9.0, 3: 3.0}


def test_golden_none_orders_by_the_rerank_score_and_gives_the_tail_its_recall_score():
    assert rank_final(GOLDEN_POOL, GOLDEN_RERANK, Fusion.NONE, 0.5) == [
        (2, 9.0), (3, 3.0), (0, 1.0), (1, -5.0), (4, -8.0), (5, -9.0)]


def test_golden_linear_mixes_zscores_of_the_recall_score_and_keeps_recall_order_among_ties():
    recall_z = [7 / 5, 1 / 5, -1 / 5, -7 / 5]  # (score - 0) / 5, the recall order's score, not the cosine
    rerank_z = [-1 / 5, -7 / 5, 7 / 5, 1 / 5]  # (rerank - 2) / 5
    fused = [0.5 * r + 0.5 * c for r, c in zip(rerank_z, recall_z)]
    assert fused[0] == fused[2] and fused[1] == fused[3]  # two ties: recall order decides each
    assert rank_final(GOLDEN_POOL, GOLDEN_RERANK, Fusion.LINEAR, 0.5) == [
        (0, fused[0]), (2, fused[2]), (1, fused[1]), (3, fused[3]), (4, -8.0), (5, -9.0)]


def test_golden_rrf_adds_reciprocal_ranks_and_keeps_recall_order_among_ties():
    # rerank ranks by position: 3, 4, 1, 2; recall ranks: 1, 2, 3, 4
    fused = [1 / (RRF_K + 3) + 1 / (RRF_K + 1), 1 / (RRF_K + 4) + 1 / (RRF_K + 2),
             1 / (RRF_K + 1) + 1 / (RRF_K + 3), 1 / (RRF_K + 2) + 1 / (RRF_K + 4)]
    assert fused[0] == fused[2] and fused[1] == fused[3]
    assert rank_final(GOLDEN_POOL, GOLDEN_RERANK, Fusion.RRF, 0.5) == [
        (0, fused[0]), (2, fused[2]), (1, fused[1]), (3, fused[3]), (4, -8.0), (5, -9.0)]


def test_golden_calibrated_reads_the_cosine_and_bm25_and_caps_the_tail_below_the_reranked():
    calibration = Calibration(scale=8.0, center=0.5, lexical_scale=0.5, lexical_center=10.0)
    # recall logits, 8 * (cosine - 0.5) + 0.5 * (bm25 - 10): 2, 2, -1, -1, 2, -4
    # fused logits, 0.5 * rerank + 0.5 * recall logit: 1.5, -1.5, 4, 1
    ranked = rank_final(GOLDEN_POOL, GOLDEN_RERANK, Fusion.CALIBRATED, 0.5, calibration, lexical=True)
    assert [i for i, _ in ranked] == [2, 0, 3, 1, 4, 5]
    lowest_reranked = sigmoid(-1.5)
    # numpy's exp and libm's may differ in the last bit: compared to within a few units in the last place.
    expected = [sigmoid(4.0), sigmoid(1.5), sigmoid(1.0), lowest_reranked,
                math.nextafter(ranked[3][1], -math.inf),  # its recall part, sigmoid(0.5 * 2), lies above: capped
                sigmoid(0.5 * -4)]
    assert ranked[4][1] == math.nextafter(ranked[3][1], -math.inf)
    assert [score for _, score in ranked] == [pytest.approx(e, rel=1e-15, abs=0) for e in expected]


# The methods by name


def test_fusion_methods_keep_the_names_settings_json_and_flags_use():
    assert [f.value for f in Fusion] == ["none", "linear", "rrf", "calibrated"]
    assert [f.value for f in HybridFusion] == ["zscore", "rrf"]
    assert GatewaySettings(fusion="rrf").fusion is Fusion.RRF
    assert RecallSettings(hybrid_fusion="rrf").hybrid_fusion is HybridFusion.RRF
    assert decode_body(b'{"query": "q", "fusion": "rrf"}', SearchBody).fusion is Fusion.RRF
    assert json.dumps({"fusion": Fusion.CALIBRATED}) == '{"fusion": "calibrated"}'
    assert f"{Fusion.LINEAR}" == str(Fusion.LINEAR) == "linear"


def test_every_fusion_method_converts_to_its_proto_value_and_back():
    assert {fusion_to_proto(f) for f in Fusion} == set(gateway_pb2.FusionMethod.values()) - {
        gateway_pb2.FUSION_METHOD_UNSPECIFIED}
    for fusion in Fusion:
        assert fusion_from_proto(fusion_to_proto(fusion)) is fusion
        assert gateway_pb2.FusionMethod.Name(fusion_to_proto(fusion)) == f"FUSION_{fusion.value.upper()}"
    assert fusion_to_proto(None) == gateway_pb2.FUSION_METHOD_UNSPECIFIED
    assert fusion_from_proto(gateway_pb2.FUSION_METHOD_UNSPECIFIED) is None  # the gateway's default applies
    assert fusion_from_proto(99) is None
    for method in HybridFusion:
        assert hybrid_fusion_from_proto(hybrid_fusion_to_proto(method)) is method
        assert recall_pb2.HybridFusion.Name(hybrid_fusion_to_proto(method)) == f"HYBRID_FUSION_{method.value.upper()}"
    assert {hybrid_fusion_to_proto(m) for m in HybridFusion} == set(recall_pb2.HybridFusion.values()) - {
        recall_pb2.HYBRID_FUSION_UNSPECIFIED}
    assert hybrid_fusion_from_proto(recall_pb2.HYBRID_FUSION_UNSPECIFIED) is None
