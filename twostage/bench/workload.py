"""Benchmark inputs from a BEIR data set: queries with recall_k-sized candidate lists."""

import random
from dataclasses import dataclass
from pathlib import Path

from twostage.corpus import DEMO_CORPUS, document_text, read_corpus, read_qrels, read_queries

FULL_SCIFACT = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "scifact"


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]


def default_dataset() -> Path:
    """The full SciFact set when it sits beside the checkout, else the shipped slice."""
    return FULL_SCIFACT if (FULL_SCIFACT / "corpus.jsonl").exists() else DEMO_CORPUS


def rerank_workload(dataset: Path, queries: int, candidates: int, seed: int = 7) -> list[RerankRequest]:
    """Each query's judged documents plus random others, ``candidates`` in all, shuffled.

    The candidates are real abstracts, so their lengths vary as real candidate
    lists do; the set is fixed by ``seed`` so runs compare.
    """
    docs = {d.id: document_text(d) for d in read_corpus(dataset)}
    texts = read_queries(dataset)
    qrels = read_qrels(dataset)
    rng = random.Random(seed)
    ids = sorted(docs)
    requests = []
    for query_id in sorted(qrels)[:queries]:
        chosen = [d for d in qrels[query_id] if d in docs][:candidates]
        while len(chosen) < candidates:
            pick = rng.choice(ids)
            if pick not in chosen:
                chosen.append(pick)
        rng.shuffle(chosen)
        requests.append(RerankRequest(texts[query_id], [docs[d] for d in chosen]))
    return requests


def documents(dataset: Path, count: int) -> list:
    out = []
    for doc in read_corpus(dataset):
        out.append(doc)
        if len(out) == count:
            break
    return out
