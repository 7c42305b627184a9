"""Peers run in their own virtual environments (their dependencies conflict
with the export extra), each as a subprocess that prints one JSON line.

``make bench-peers`` creates them: .venv-peers (sentence-transformers with
its ONNX backend) and .venv-infinity (infinity-emb).
"""

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

# Where `make bench-peers` put the environments: the checkout (TWOSTAGE_PEER_ENVS to look elsewhere).
ROOT = Path(os.environ.get("TWOSTAGE_PEER_ENVS") or Path(__file__).resolve().parents[3])
HERE = Path(__file__).resolve().parent
PEERS = {
    "sentence-transformers": (ROOT / ".venv-peers" / "bin" / "python", HERE / "st_crossencoder.py"),
    "infinity": (ROOT / ".venv-infinity" / "bin" / "python", HERE / "infinity_rerank.py"),
}
# ms-marco-MiniLM-L-12-v2's architecture, for loaders that want a Hugging Face config.
CROSS_ENCODER_CONFIG = {
    "architectures": ["BertForSequenceClassification"],
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "vocab_size": 30522,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "id2label": {"0": "LABEL_0"},
    "label2id": {"LABEL_0": 0},
}


def hugging_face_layout(model_dir: Path, out: Path) -> Path:
    """The same model.onnx in the layout Hugging Face loaders expect.

    The shipped tokenizer.json pads every input to 512; a careful user turns
    that off, so the peers get the same unpadded tokenizer twostage uses.
    """
    # sentence-transformers looks in onnx/, Infinity at the top level.
    (out / "onnx").mkdir(parents=True)
    shutil.copy(model_dir / "model.onnx", out / "model.onnx")
    os.link(out / "model.onnx", out / "onnx" / "model.onnx")
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    tokenizer["padding"] = None
    tokenizer["truncation"] = None
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    (out / "config.json").write_text(json.dumps(CROSS_ENCODER_CONFIG))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    return out


def run_peer(name: str, model_dir: Path, workload, max_length: int) -> float | str:
    """The peer's pairs/s on the same pairs, or the reason it could not run."""
    python, script = PEERS[name]
    if not python.exists():
        return f"not installed ({python.parent.parent.name} missing; run make bench-peers)"
    with tempfile.TemporaryDirectory() as tmp:
        layout = hugging_face_layout(Path(model_dir), Path(tmp) / "model")
        pairs_file = Path(tmp) / "workload.json"
        pairs_file.write_text(json.dumps([{"query": r.query, "documents": r.documents} for r in workload]))
        result = subprocess.run(
            [str(python), str(script), str(layout), str(pairs_file), str(max_length)],
            capture_output=True, text=True, timeout=1800, check=False,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"failed: {reason[:300]}"
    outcome = json.loads(lines[-1])
    return outcome["pairs_per_s"] if "pairs_per_s" in outcome else f"could not run: {outcome.get('error')}"
