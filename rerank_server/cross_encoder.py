"""The cross-encoder: tokenize pairs (pre), run the model on a batch (core), return one relevance logit per
pair (post). How batches run is the execution plan's (twostage.execution_plan)."""

import itertools
from pathlib import Path
from typing import NamedTuple

import numpy as np

from twostage import errors, execution_plan
from twostage.config import RuntimeSettings
from twostage.corpus import DEMO_CORPUS, document_text, read_corpus, read_queries
from twostage.model_store import ManifestModel
from twostage.runtime import Encoded, cut_by, encode_all, load_tokenizer, pad_batch

TYPICAL_PAIRS = 4  # pairs an execution plan is chosen on: SciFact abstracts with a claim, mostly cut at max_length


class FittedQuery(NamedTuple):
    text: str  # the query as scored
    truncated: bool  # it was cut to fit


class EncodedPairs(NamedTuple):
    pairs: list[Encoded]
    query_truncated: bool


class CrossEncoder(ManifestModel):
    def __init__(self, model_dir: Path, runtime: RuntimeSettings, max_length: int):
        super().__init__(model_dir, "rerank", max_length)
        # A longer query is cut to this many tokens, so every document keeps at least half the window.
        self.max_query_tokens = self.max_length // 2
        self.tokenizer = load_tokenizer(model_dir, self.max_length, pair_truncation=True)
        # Counting a query's tokens must not go through pair truncation, which fails on a lone long text.
        self._query_tokenizer = load_tokenizer(model_dir, self.max_length)
        self._query_tokenizer.no_truncation()
        self._io: tuple[set[str], str] | None = None  # input names, output name: every plan's graphs share them
        self.plan = execution_plan.load(self.model_file, runtime, self._call, self.typical_pairs, self.digest)

    def typical_pairs(self) -> list[Encoded]:
        query = next(iter(read_queries(DEMO_CORPUS).values()))
        documents = [document_text(d) for d in itertools.islice(read_corpus(DEMO_CORPUS), TYPICAL_PAIRS)]
        return self.encode(query, documents).pairs

    def fit_query(self, query: str) -> FittedQuery:
        """The query as scored: cut after ``max_query_tokens`` tokens when longer."""
        encoding = self._query_tokenizer.encode(query, add_special_tokens=False)
        if len(encoding.ids) <= self.max_query_tokens:
            return FittedQuery(query, False)
        end = encoding.offsets[self.max_query_tokens - 1][1]
        return FittedQuery(query[:end], True)

    def encode(self, query: str, documents: list[str]) -> EncodedPairs:
        """Tokenize (query, document) pairs; documents fill what the query leaves of the window."""
        fitted = self.fit_query(query)
        return EncodedPairs(self.encode_pairs(fitted.text, documents), fitted.truncated)

    def check_fits(self, query: str, documents: list[str]) -> None:
        """TooLong unless the query and each document, with it, fit in the window uncut."""
        if self.fit_query(query).truncated:
            raise errors.TooLong(f"the query is longer than {self.max_query_tokens} tokens, half the model's window; "
                                 "shorten it, or allow truncation")
        if cut_by(self.tokenizer, [(query, doc) for doc in documents]):
            raise errors.TooLong(f"a document does not fit in the model's window ({self.max_length} tokens) with the "
                                 "query; shorten it, or allow truncation")

    def encode_pairs(self, fitted_query: str, documents: list[str]) -> list[Encoded]:
        """Tokenize pairs for a query already cut by ``fit_query``."""
        return encode_all(self.tokenizer, [(fitted_query, doc) for doc in documents])

    def _call(self, session, batch: list[Encoded]) -> np.ndarray:
        if self._io is None:
            self._io = {i.name for i in session.get_inputs()}, session.get_outputs()[0].name
        inputs, output = self._io
        (logits,) = session.run([output], pad_batch(batch, inputs))
        return logits.reshape(len(batch), -1)[:, 0].astype(np.float32)

    def score(self, batch: list[Encoded]) -> np.ndarray:
        """One relevance logit per pair; higher is more relevant. The same for a pair whatever its batch-mates
        (unless batch_invariant is off)."""
        return self.plan.run(batch, self._call)

    def close(self) -> None:
        """Stop the plan's threads (no batch may be running)."""
        self.plan.close()
