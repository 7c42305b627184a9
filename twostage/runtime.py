"""onnxruntime providers, tokenizers and the padded feeds of a batch (sessions: twostage.execution_plan)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

try:
    import onnxruntime as ort
except ImportError:  # the cpu and gpu extras each bring one; they must not be installed together
    raise ImportError("twostage needs onnxruntime: install 'twostage[cpu]', or 'twostage[gpu]' (onnxruntime-gpu) "
                      "on a CUDA machine") from None

from twostage.errors import InvalidArgument

_PROVIDERS_BY_NAME = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def choose_providers(provider: str, available: list[str] | None = None) -> list[str]:
    """Providers to ask for, best first. ``auto`` uses what the installed onnxruntime offers."""
    available = available if available is not None else ort.get_available_providers()
    if provider == "auto":
        wanted = _PROVIDERS_BY_NAME["tensorrt"]
        return [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    wanted = _PROVIDERS_BY_NAME[provider]
    if wanted[0] not in available:
        raise InvalidArgument(
            f"provider {provider!r} needs {wanted[0]}, which this onnxruntime lacks (has {available}); "
            "install the gpu extra or use provider=cpu"
        )
    return [p for p in wanted if p in available]


def load_tokenizer(model_dir: Path, max_length: int, pair_truncation: bool = False) -> Tokenizer:
    """Load tokenizer.json without padding; the batcher pads per batch.

    Shipped tokenizer files may pad every input to a fixed length, which would
    waste most of every batch, so padding is always turned off here. For
    pairs, only the second sequence (the document) is truncated.
    """
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="only_second" if pair_truncation else "longest_first")
    return tokenizer


@dataclass(frozen=True, eq=False)
class Encoded:
    """One tokenized input, unpadded; its length is its cost in the batcher."""

    ids: np.ndarray
    type_ids: np.ndarray

    @property
    def length(self) -> int:
        return len(self.ids)


def encode_all(tokenizer: Tokenizer, inputs: list) -> list[Encoded]:
    return [
        Encoded(np.asarray(e.ids, dtype=np.int64), np.asarray(e.type_ids, dtype=np.int64))
        for e in tokenizer.encode_batch(inputs)
    ]


def cut_by(tokenizer: Tokenizer, inputs: list) -> bool:
    """Whether ``tokenizer`` (which truncates) cuts any of ``inputs``: what a caller that asked for no truncation
    must be refused for."""
    return any(e.overflowing for e in tokenizer.encode_batch(inputs))


def pad_batch(batch: list[Encoded], input_names: set[str]) -> dict[str, np.ndarray]:
    """Right-pad a batch to its longest item (pad id 0) as the model's feeds."""
    longest = max(item.length for item in batch)
    ids = np.zeros((len(batch), longest), dtype=np.int64)
    type_ids = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for row, item in enumerate(batch):
        ids[row, : item.length] = item.ids
        type_ids[row, : item.length] = item.type_ids
        mask[row, : item.length] = 1
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": type_ids}
    return {name: value for name, value in feeds.items() if name in input_names}
