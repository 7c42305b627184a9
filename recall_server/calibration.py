"""Constants that put this index's cosines and BM25 on the cross-encoder's logit scale, fitted from the index.

The gateway's calibrated fusion adds ``scale * (cosine - center) + lexical_scale * (bm25 - lexical_center)`` to
the cross-encoder's logit. Where a cosine or a BM25 counts as neutral depends on the corpus (short product texts
sit far lower than scientific abstracts), so each recall server measures it on its own documents:

- pseudo-queries: the titles (or first sentences) of a fixed sample of documents, embedded as queries;
- relevant pairs: each pseudo-query with its own document; irrelevant pairs: with random other documents.

``center`` is a high quantile (``IRRELEVANT_QUANTILE``) of the irrelevant scores: what an unrelated document
reaches at best counts as no evidence, and only more than that as evidence for. ``scale`` puts the typical
relevant score (the median) ``SPAN`` logits above it. The spans were set so that SciFact's fit lands near the
constants fitted there by hand (100 per cosine unit, 0.5 per BM25 point; the fit gives 94.4 and 0.42), and
``twostage eval`` checks that it ranks no worse: it fuses the same answers with both sets of constants. The
hand-fitted centres (0.72, 13) were SciFact's own and put every hit of a catalogue of short product texts near 0.
Ranking within one query depends only on the scales; the centres give scores their absolute meaning.
"""

from dataclasses import dataclass

import numpy as np

from twostage.corpus import Document
from twostage.scoring import Calibration

PSEUDO_QUERIES = 256
IRRELEVANT_PER_QUERY = 16
IRRELEVANT_QUANTILE = 0.99
COSINE_SPAN = 19.0  # logits from the irrelevant quantile to the median relevant cosine
LEXICAL_SPAN = 18.0  # the same for BM25
MIN_DOCS = 5  # fewer leave too few distinct irrelevant pairs to place a quantile (SciFact's constants stand in)
MIN_COSINE_GAP = 0.02  # a degenerate corpus (every document alike) must not give an enormous scale
MIN_LEXICAL_GAP = 1.0
PSEUDO_QUERY_CHARS = 200
PSEUDO_QUERY_WORDS = 10  # without a title: a query is a few words, never the whole document


@dataclass(frozen=True, kw_only=True)
class FittedCalibration(Calibration):
    """The constants as fitted from an index, with what they were fitted on."""

    pseudo_queries: int
    doc_count: int  # live documents when fitted


def pseudo_query(doc: Document) -> str:
    """What a searcher for this document might type: its title, else the start of its first sentence, at most
    ``PSEUDO_QUERY_WORDS`` words and half the document's (a pair of a text with itself is no query)."""
    if doc.title.strip():
        return doc.title.strip()[:PSEUDO_QUERY_CHARS]
    words = doc.text.split()
    first = doc.text.strip().split(". ")[0].split()
    return " ".join(first[:max(1, min(PSEUDO_QUERY_WORDS, len(words) // 2))])[:PSEUDO_QUERY_CHARS]


def sample_keys(keys: np.ndarray, seed: int = 0) -> np.ndarray:
    """A fixed sample (replicas of one snapshot pick the same documents and fit the same constants)."""
    keys = np.sort(np.asarray(keys, dtype=np.uint64))
    rng = np.random.default_rng(seed)
    return keys[rng.choice(len(keys), min(PSEUDO_QUERIES, len(keys)), replace=False)] if len(keys) else keys


def irrelevant_partners(sampled: np.ndarray, keys: np.ndarray, seed: int = 1) -> np.ndarray:
    """(len(sampled), IRRELEVANT_PER_QUERY) random other documents for each sampled one."""
    keys = np.sort(np.asarray(keys, dtype=np.uint64))
    rng = np.random.default_rng(seed)
    partners = keys[rng.integers(0, len(keys), size=(len(sampled), IRRELEVANT_PER_QUERY))]
    # A draw of the document itself is replaced by its neighbour in key order (never itself: len(keys) >= 2).
    same = partners == sampled[:, None]
    if same.any():
        following = keys[(np.searchsorted(keys, partners[same]) + 1) % len(keys)]
        partners[same] = following
    return partners


def fit(own_cosine: np.ndarray, other_cosine: np.ndarray, own_bm25: np.ndarray, other_bm25: np.ndarray,
        doc_count: int) -> FittedCalibration:
    """The constants from relevant (own) and irrelevant (other) scores; BM25 empty: the index has no lexical
    part, and the lexical constants are 0 (no lexical search runs there)."""
    center = float(np.quantile(other_cosine, IRRELEVANT_QUANTILE))
    gap = max(float(np.median(own_cosine)) - center, MIN_COSINE_GAP)
    lexical_scale = lexical_center = 0.0
    if len(own_bm25) and len(other_bm25):
        lexical_center = float(np.quantile(other_bm25, IRRELEVANT_QUANTILE))
        lexical_scale = LEXICAL_SPAN / max(float(np.median(own_bm25)) - lexical_center, MIN_LEXICAL_GAP)
    return FittedCalibration(scale=COSINE_SPAN / gap, center=center, lexical_scale=lexical_scale,
                             lexical_center=lexical_center, pseudo_queries=len(own_cosine), doc_count=doc_count)
