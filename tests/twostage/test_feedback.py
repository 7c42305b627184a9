"""The Rocchio step both recall and the gateway run: unit vector out, toward the hits, the same bits wherever
it runs; per-request fields checked by name; which modes get it."""

import numpy as np
import pytest

from twostage import feedback
from twostage.errors import InvalidArgument
from twostage.feedback import Feedback


def unit_rows(rng, n, dims=8):
    rows = rng.standard_normal((n, dims)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_refine_moves_the_query_toward_its_hits_and_stays_a_unit_vector():
    rng = np.random.default_rng(3)
    query, hits = 3 * unit_rows(rng, 1)[0], unit_rows(rng, 4)  # the query's length must not matter
    centroid = hits.mean(axis=0) / np.linalg.norm(hits.mean(axis=0))
    refined = feedback.refine(query, hits, 0.5)
    assert refined.dtype == np.float32 and np.linalg.norm(refined) == pytest.approx(1, abs=1e-6)
    assert refined @ centroid > (query / np.linalg.norm(query)) @ centroid
    expected = 0.5 * query / np.linalg.norm(query) + 0.5 * hits.mean(axis=0)
    np.testing.assert_allclose(refined, expected / np.linalg.norm(expected), atol=1e-6)
    np.testing.assert_allclose(feedback.refine(query, hits, 1.0), centroid, atol=1e-6)  # the hits alone
    assert feedback.refine(query, hits, 0.0) is query and feedback.refine(query, hits[:0], 0.5) is query


def test_a_weight_from_a_setting_or_from_a_request_gives_the_same_bits():
    """A gateway reads the weight from a proto float, a recall server from its settings (a double)."""
    rng = np.random.default_rng(5)
    query, hits = unit_rows(rng, 1)[0], unit_rows(rng, 5)
    from_request = float(np.float32(0.3))
    assert from_request != 0.3
    assert feedback.refine(query, hits, 0.3).tobytes() == feedback.refine(query, hits, from_request).tobytes()


def test_request_fields_fall_back_to_the_default_and_are_named_when_bad():
    default = Feedback(5, 0.5)
    assert feedback.check(None, None, default) == default
    assert feedback.check(0, None, default) == Feedback(0, 0.5) and not Feedback(0, 0.5).active
    assert feedback.check(2, 0.25, default) == Feedback(2, 0.25)
    with pytest.raises(InvalidArgument, match=r"prf_depth must be between 0 and 100, got 101"):
        feedback.check(101, None, default)
    for weight in (1.5, -0.1, float("nan")):
        with pytest.raises(InvalidArgument, match="prf_weight must be between 0 and 1"):
            feedback.check(None, weight, default)


def test_hybrid_gets_the_default_dense_only_when_asked_lexical_never():
    prf = Feedback(5, 0.5)
    assert feedback.for_mode(prf, "hybrid", asked=False) == prf
    assert feedback.for_mode(prf, "dense", asked=False) == feedback.OFF
    assert feedback.for_mode(prf, "dense", asked=True) == prf
    assert feedback.for_mode(prf, "lexical", asked=True) == feedback.OFF
