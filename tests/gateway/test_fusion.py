import pytest

from gateway.fusion import RRF_K, fuse


def test_none_is_the_rerank_score():
    assert fuse([0.9, 0.8], [1.0, 3.0], "none", 0.5) == [1.0, 3.0]


def test_linear_mixes_per_query_zscores():
    # recall z: [1, -1]; rerank z: [-1, 1]
    assert fuse([0.9, 0.7], [2.0, 4.0], "linear", 0.7) == pytest.approx([0.7 * -1 + 0.3 * 1, 0.7 * 1 + 0.3 * -1])
    assert fuse([0.9, 0.7], [2.0, 4.0], "linear", 1.0) == pytest.approx([-1.0, 1.0])
    assert fuse([0.5, 0.5], [1.0, 1.0], "linear", 0.5) == [0.0, 0.0]  # no spread, no preference


def test_rrf_adds_reciprocal_ranks():
    scores = fuse([0.9, 0.8, 0.7], [0.1, 5.0, 2.0], "rrf", 0.0)
    # rerank ranks: [3, 1, 2]; recall ranks: [1, 2, 3]
    expected = [1 / (RRF_K + 3) + 1 / (RRF_K + 1), 1 / (RRF_K + 1) + 1 / (RRF_K + 2), 1 / (RRF_K + 2) + 1 / (RRF_K + 3)]
    assert scores == pytest.approx(expected)


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError):
        fuse([1.0], [1.0], "max", 0.5)  # type: ignore[arg-type]
