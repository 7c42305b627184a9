"""Calibration constants, fitted and overridden: the fit centres on unrelated pairs and scales to the related,
settings override each constant, and pseudo-queries are titles or the start of the first sentence. (Scores on
real indexes through a real stack: tests/system/test_calibration.py.)"""

import numpy as np
import pytest

from gateway.config import GatewaySettings
from recall_server import calibration
from twostage.corpus import Document
from twostage.scoring import DEFAULT_CALIBRATION, Calibration


def test_fit_centres_on_unrelated_pairs_and_scales_to_the_related():
    rng = np.random.default_rng(0)
    other, own = rng.normal(0.45, 0.05, 4000), rng.normal(0.83, 0.03, 256)
    fitted = calibration.fit(own, other, np.full(256, 9.0), np.zeros(4000), doc_count=500)
    assert fitted.center == pytest.approx(np.quantile(other, 0.99))
    assert fitted.scale * (np.median(own) - fitted.center) == pytest.approx(calibration.COSINE_SPAN)
    assert (fitted.lexical_center, fitted.lexical_scale) == (0.0, pytest.approx(calibration.LEXICAL_SPAN / 9))
    # No lexical part: no lexical constants; every document alike: a bounded scale.
    flat = calibration.fit(np.full(20, 0.5), np.full(300, 0.5), np.zeros(0), np.zeros(0), doc_count=20)
    assert flat.lexical_scale == 0 and flat.scale == calibration.COSINE_SPAN / calibration.MIN_COSINE_GAP


def test_settings_override_each_fitted_constant_and_defaults_stand_in_for_no_fit():
    fitted = Calibration(80.0, 0.6, 2.0, 1.5)
    assert GatewaySettings().calibration(fitted) == fitted
    assert GatewaySettings().calibration(None) == DEFAULT_CALIBRATION
    assert GatewaySettings(calibrated_recall_center=0.7).calibration(fitted) == Calibration(80.0, 0.7, 2.0, 1.5)


def test_pseudo_queries_are_titles_or_the_start_of_the_first_sentence():
    assert calibration.pseudo_query(Document("a", "Drip coffee maker", "Brews coffee.")) == "Drip coffee maker"
    assert calibration.pseudo_query(Document("a", "", "Brews strong coffee. Has a timer.")) == "Brews strong coffee"
    # One sentence and no title: never the whole text (a document paired with itself is no query).
    one = "Drip coffee maker: brews ten cups of coffee with a timer and a warming plate"
    assert calibration.pseudo_query(Document("a", "", one)) == "Drip coffee maker: brews ten cups of"
    assert calibration.pseudo_query(Document("a", "", "Kettle")) == "Kettle"
