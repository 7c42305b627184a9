"""Export a Hugging Face model to ONNX with ``optimum`` and write its manifest.

Needs the ``export`` extra (torch, transformers, optimum-onnx). ``--model`` may
be a local directory or a Hugging Face id (downloaded by optimum; needs the
hub to be reachable).
"""

import json
from pathlib import Path

from twostage.errors import InvalidArgument
from twostage.manifest import ModelManifest
from twostage.model_store import sha256_of

HF_TASKS = {"embed": "feature-extraction", "rerank": "text-classification"}


def _sentence_transformers_config(model_dir: Path) -> dict:
    """Pooling, normalisation and max length from a sentence-transformers layout, if present."""
    found: dict = {}
    pooling_file = model_dir / "1_Pooling" / "config.json"
    if pooling_file.exists():
        pooling = json.loads(pooling_file.read_text())
        found["pooling"] = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        found["normalize"] = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules_file.read_text()))
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.exists():
        found["max_length"] = json.loads(st_config.read_text()).get("max_seq_length")
    return {k: v for k, v in found.items() if v is not None}


def quantize_int8(model_path: Path) -> Path:
    """Dynamic int8 quantisation of the MatMul weights, per channel.

    Per-tensor quantisation of every op cost MiniLM-L6 up to 0.06 cosine
    against fp32; per-channel MatMul-only stays above 0.98.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = model_path.with_name("model.int8.onnx")
    quantize_dynamic(
        str(model_path), str(out), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )
    return out


def export_model(
    model: str,
    task: str,
    out: Path,
    int8: bool = False,
    pooling: str | None = None,
    query_prefix: str = "",
    max_length: int | None = None,
    name: str | None = None,
) -> ModelManifest:
    if task not in HF_TASKS:
        raise InvalidArgument(f"task must be one of {', '.join(HF_TASKS)}, got {task!r}")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as error:
        raise InvalidArgument(f"export needs the export extra: pip install 'twostage[export]' ({error})") from None
    local = Path(model).expanduser()
    out = Path(out)
    main_export(
        str(local) if local.is_dir() else model,
        out,
        task=HF_TASKS[task],
        library_name="transformers",
        local_files_only=local.is_dir(),
    )
    detected = _sentence_transformers_config(local) if local.is_dir() else {}
    onnx_file = out / "model.onnx"
    if int8:
        onnx_file = quantize_int8(onnx_file)
    manifest = ModelManifest(
        name=name or (local.name if local.is_dir() else model.replace("/", "--")),
        task=task,  # type: ignore[arg-type]
        max_length=max_length or detected.get("max_length") or 512,
        pooling=pooling or detected.get("pooling", "mean"),  # type: ignore[arg-type]
        normalize=detected.get("normalize", True),
        query_prefix=query_prefix,
        onnx_file=onnx_file.name,
        source=f"exported from {model} with optimum" + (", int8 dynamic quantisation" if int8 else ""),
        sha256={onnx_file.name: sha256_of(onnx_file), "tokenizer.json": sha256_of(out / "tokenizer.json")},
    )
    manifest.save(out)
    return manifest
