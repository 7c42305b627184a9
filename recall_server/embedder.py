"""The bi-encoder: tokenize text (pre), run the model on a batch (core), pool and L2-normalise (post). How
batches run is the execution plan's (twostage.execution_plan)."""

import itertools
from pathlib import Path

import numpy as np

from twostage import errors, execution_plan
from twostage.config import RuntimeSettings
from twostage.corpus import DEMO_CORPUS, document_text, read_corpus
from twostage.model_store import ManifestModel
from twostage.runtime import Encoded, cut_by, encode_all, load_tokenizer, pad_batch

TYPICAL_DOCUMENTS = 4  # documents an execution plan is chosen on: SciFact abstracts


class Embedder(ManifestModel):
    def __init__(self, model_dir: Path, runtime: RuntimeSettings, max_length: int | None = None):
        super().__init__(model_dir, "embed", max_length)
        self.tokenizer = load_tokenizer(model_dir, self.max_length)
        self._io: tuple[set[str], str] | None = None  # input names, output name: every plan's graphs share them
        self.plan = execution_plan.load(self.model_file, runtime, self._call, self.typical_documents, self.digest)
        session = self.plan.sessions[0]
        self.dims = int(next(o for o in session.get_outputs() if o.name == self._output(session)).shape[-1])

    def typical_documents(self) -> list[Encoded]:
        texts = [document_text(d) for d in itertools.islice(read_corpus(DEMO_CORPUS), TYPICAL_DOCUMENTS)]
        return self.encode(texts, is_query=False)

    def encode(self, texts: list[str], is_query: bool) -> list[Encoded]:
        prefix = self.manifest.query_prefix if is_query else ""
        return encode_all(self.tokenizer, [prefix + text for text in texts])

    def check_fits(self, texts: list[str], is_query: bool) -> None:
        """TooLong unless every text fits in the model's window uncut."""
        prefix = self.manifest.query_prefix if is_query else ""
        if cut_by(self.tokenizer, [prefix + text for text in texts]):
            raise errors.TooLong(f"a text is longer than the model's window ({self.max_length} tokens); shorten it, "
                                 "or allow truncation")

    @staticmethod
    def _output(session) -> str:
        """Some exports carry a pooled output already; it is used when present."""
        outputs = [o.name for o in session.get_outputs()]
        return "sentence_embedding" if "sentence_embedding" in outputs else outputs[0]

    def _call(self, session, batch: list[Encoded]) -> np.ndarray:
        """(len(batch), dims) float32 from one model call, unit length when the manifest says normalize."""
        if self._io is None:
            self._io = {i.name for i in session.get_inputs()}, self._output(session)
        inputs, output = self._io
        feeds = pad_batch(batch, inputs)
        (hidden,) = session.run([output], feeds)
        if output == "sentence_embedding":
            pooled = hidden
        elif self.manifest.pooling == "cls":
            pooled = hidden[:, 0]
        else:  # each row over its own tokens: summing its padding too would regroup the sum (not bit-invariant)
            pooled = np.stack([hidden[row, : item.length].mean(axis=0) for row, item in enumerate(batch)])
        pooled = pooled.astype(np.float32)
        if self.manifest.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled

    def embed(self, batch: list[Encoded]) -> np.ndarray:
        """(len(batch), dims) float32; an item's vector is the same whatever its batch-mates (unless
        batch_invariant is off)."""
        return self.plan.run(batch, self._call)

    @property
    def graph(self) -> str:
        """Which graph's vectors this embedder gives ("stock", "per-row", or "stock, batched"): vectors of one
        graph are bit-identical; across graphs they differ slightly (cosine about 0.999), so an index records
        the graph that embedded it."""
        return self.plan.graph

    def close(self) -> None:
        """Stop the plan's threads (no batch may be running)."""
        self.plan.close()
