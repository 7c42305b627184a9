"""The cross-encoder: tokenize pairs (pre), run the model on a batch (core),
return one relevance logit per pair (post)."""

from pathlib import Path

import numpy as np

from twostage.config import RuntimeSettings
from twostage.errors import InvalidArgument
from twostage.manifest import ModelManifest
from twostage.runtime import Encoded, create_session, encode_all, load_tokenizer, pad_batch


class CrossEncoder:
    def __init__(self, model_dir: Path, runtime: RuntimeSettings, max_length: int):
        self.manifest = ModelManifest.load(model_dir)
        self.manifest.require_task("rerank")
        self.max_length = min(max_length, self.manifest.max_length)
        # The query is never truncated, so it must leave room for the document.
        self.max_query_tokens = self.max_length // 2
        self.session = create_session(Path(model_dir) / self.manifest.onnx_file, runtime)
        self.tokenizer = load_tokenizer(model_dir, self.max_length, pair_truncation=True)
        self._input_names = {i.name for i in self.session.get_inputs()}
        self._output_name = self.session.get_outputs()[0].name

    @property
    def name(self) -> str:
        return self.manifest.name

    def encode(self, query: str, documents: list[str]) -> list[Encoded]:
        """Tokenize (query, document) pairs; documents are truncated, queries never."""
        query_tokens = len(self.tokenizer.encode(query, add_special_tokens=False).ids)
        if query_tokens > self.max_query_tokens:
            raise InvalidArgument(
                f"query is {query_tokens} tokens; the limit is {self.max_query_tokens} "
                f"(half of max_length {self.max_length})"
            )
        return encode_all(self.tokenizer, [(query, doc) for doc in documents])

    def score(self, batch: list[Encoded]) -> np.ndarray:
        """One relevance logit per pair; higher is more relevant."""
        (logits,) = self.session.run([self._output_name], pad_batch(batch, self._input_names))
        return logits.reshape(len(batch), -1)[:, 0].astype(np.float32)
