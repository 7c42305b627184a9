"""The bi-encoder: tokenize text (pre), run the model on a batch (core), pool
and L2-normalise (post)."""

from pathlib import Path

import numpy as np

from twostage import errors
from twostage.config import RuntimeSettings
from twostage.manifest import ModelManifest
from twostage.runtime import Encoded, create_session, cut_by, encode_all, load_tokenizer, pad_batch


class Embedder:
    def __init__(self, model_dir: Path, runtime: RuntimeSettings, max_length: int | None = None):
        self.manifest = ModelManifest.load(model_dir)
        self.manifest.require_task("embed")
        self.max_length = min(max_length or self.manifest.max_length, self.manifest.max_length)
        self.session = create_session(Path(model_dir) / self.manifest.onnx_file, runtime)
        self.tokenizer = load_tokenizer(model_dir, self.max_length)
        self._input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        # Some exports carry a pooled output already; use it when present.
        self._pooled_output = "sentence_embedding" in outputs
        self._output_name = "sentence_embedding" if self._pooled_output else outputs[0]
        self.dims = int(self.session.get_outputs()[outputs.index(self._output_name)].shape[-1])

    @property
    def name(self) -> str:
        return self.manifest.name

    def encode(self, texts: list[str], is_query: bool) -> list[Encoded]:
        prefix = self.manifest.query_prefix if is_query else ""
        return encode_all(self.tokenizer, [prefix + text for text in texts])

    def check_fits(self, texts: list[str], is_query: bool) -> None:
        """TooLong unless every text fits in the model's window uncut."""
        prefix = self.manifest.query_prefix if is_query else ""
        if cut_by(self.tokenizer, [prefix + text for text in texts]):
            raise errors.TooLong(f"a text is longer than the model's window ({self.max_length} tokens); shorten it, "
                                 "or allow truncation")

    def embed(self, batch: list[Encoded]) -> np.ndarray:
        """(len(batch), dims) float32, unit length when the manifest says normalize."""
        feeds = pad_batch(batch, self._input_names)
        (hidden,) = self.session.run([self._output_name], feeds)
        if self._pooled_output:
            pooled = hidden
        elif self.manifest.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = feeds["attention_mask"][:, :, None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        pooled = pooled.astype(np.float32)
        if self.manifest.normalize:
            pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return pooled
