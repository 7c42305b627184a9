"""The small manifest a model directory carries, so servers need no flags to
use a model right (pooling, prefix, max length, task)."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from twostage.errors import ModelMismatch

MANIFEST_NAME = "twostage-model.json"


@dataclass(frozen=True)
class ModelManifest:
    name: str
    task: Literal["embed", "rerank"]
    max_length: int
    # Embedding models only.
    pooling: Literal["cls", "mean"] = "cls"
    normalize: bool = True
    query_prefix: str = ""
    onnx_file: str = "model.onnx"
    source: str = ""
    sha256: dict[str, str] = field(default_factory=dict)

    def save(self, model_dir: Path) -> None:
        (Path(model_dir) / MANIFEST_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, model_dir: Path) -> "ModelManifest":
        path = Path(model_dir) / MANIFEST_NAME
        if not path.exists():
            raise ModelMismatch(
                f"{model_dir} has no {MANIFEST_NAME}; fetch a default model with "
                "'twostage models fetch' or export one with 'twostage models export'"
            )
        return cls(**json.loads(path.read_text()))

    def require_task(self, task: str) -> None:
        if self.task != task:
            raise ModelMismatch(f"model {self.name!r} is a {self.task} model; this service needs a {task} model")
