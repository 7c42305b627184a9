"""Per-row activation quantisation on the real int8 default models."""

import itertools

import numpy as np

from recall_server.embedder import Embedder
from rerank_server.cross_encoder import CrossEncoder
from twostage.config import RuntimeSettings
from twostage.corpus import DEMO_CORPUS, document_text, read_corpus

QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."


def documents(n: int) -> list[str]:
    return [document_text(d) for d in itertools.islice(read_corpus(DEMO_CORPUS), n)]


def test_rerank_scores_do_not_depend_on_batch_mates(models):
    model = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(batch_invariant=True), 256)
    pairs, _ = model.encode(QUERY, documents(10))
    alone = np.array([model.score([p])[0] for p in pairs])
    np.testing.assert_allclose(model.score(pairs), alone, atol=1e-5)
    np.testing.assert_allclose(model.score(pairs[::-1])[::-1], alone, atol=1e-5)


def test_rewrite_stays_close_to_the_shipped_quantisation(models):
    invariant = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(batch_invariant=True), 256)
    shipped = CrossEncoder(models["ms-marco-minilm-l12"], RuntimeSettings(batch_invariant=False), 256)
    pairs, _ = invariant.encode(QUERY, documents(10))
    a = np.array([invariant.score([p])[0] for p in pairs])
    b = np.array([shipped.score([p])[0] for p in pairs])
    assert np.corrcoef(a, b)[0, 1] > 0.97
    assert np.argmax(a) == np.argmax(b)


def test_embeddings_do_not_depend_on_batch_mates(models):
    embedder = Embedder(models["bge-small-en"], RuntimeSettings())
    encoded = embedder.encode(documents(6), is_query=False)
    alone = np.concatenate([embedder.embed([e]) for e in encoded])
    np.testing.assert_allclose(embedder.embed(encoded), alone, atol=1e-5)
