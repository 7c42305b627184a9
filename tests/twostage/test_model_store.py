import shutil

import pytest

from twostage import model_store
from twostage.errors import InvalidArgument, ModelMismatch
from twostage.manifest import ModelManifest


def test_fetch_is_idempotent_and_verifies(models):
    messages = []
    again = model_store.fetch_defaults(log=messages.append)
    assert again == models
    assert all("checksums ok" in m for m in messages)


def test_corrupt_model_file_is_detected(models, tmp_path):
    name = model_store.DEFAULT_RERANK_MODEL
    copy = tmp_path / name
    shutil.copytree(models[name], copy)
    manifest = model_store.DEFAULT_MODELS[name].manifest
    assert model_store.is_complete(copy, manifest, verify=True)
    with open(copy / "tokenizer.json", "ab") as f:
        f.write(b" ")
    assert not model_store.is_complete(copy, manifest, verify=True)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidArgument, match="unknown model 'no-such-model'"):
        model_store.resolve_model("no-such-model")
    with pytest.raises(ModelMismatch, match="no twostage-model.json"):
        ModelManifest.load(tmp_path)


def test_manifest_records_task(models):
    manifest = ModelManifest.load(models[model_store.DEFAULT_EMBED_MODEL])
    assert (manifest.task, manifest.pooling, manifest.normalize) == ("embed", "cls", True)
    assert manifest.query_prefix.startswith("Represent this sentence")
    with pytest.raises(ModelMismatch, match="needs a rerank model"):
        manifest.require_task("rerank")
