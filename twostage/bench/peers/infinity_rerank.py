"""Peer: the Infinity engine (infinity-emb) reranking with its ONNX (optimum)
engine. Runs in .venv-infinity; prints {"pairs_per_s": ...} or {"error": ...}.

    python infinity_rerank.py MODEL_DIR WORKLOAD_JSON MAX_LENGTH  (max length: Infinity's own)
"""

import asyncio
import json
import sys
import time


async def main(workload: list[dict]) -> None:
    model_dir = sys.argv[1]
    # Infinity hides why its ONNX engine is unavailable; import it first to report the real cause.
    from pathlib import Path

    import infinity_emb.transformer.crossencoder.optimum as infinity_optimum
    from infinity_emb import AsyncEngineArray, EngineArgs
    from optimum.onnxruntime import ORTModelForSequenceClassification  # noqa: F401

    # infinity-emb 0.0.78 passes the ONNX file's absolute path as optimum's `file_name`; optimum >= 2 compares
    # `file_name` with bare file names, so it never matches (FileNotFoundError "Could not find any ONNX files
    # with target file name .../model.onnx"). optimum < 2 cannot be used with torch 2.13 (its exporter imports
    # torch.onnx.symbolic_opset14._attention_scale). Hand optimum the bare name, as its API asks.
    find_onnx = infinity_optimum.get_onnx_files
    infinity_optimum.get_onnx_files = lambda **kwargs: Path(find_onnx(**kwargs).name)

    # The same graph as the others: Infinity's own graph optimisation off.
    args = EngineArgs(model_name_or_path=model_dir, engine="optimum", device="cpu", batch_size=32,
                      model_warmup=False, bettertransformer=False, onnx_disable_optimize=True)
    engine = AsyncEngineArray.from_args([args])[0]
    async with engine:
        await engine.rerank(query=workload[0]["query"], docs=workload[0]["documents"][:8])  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(engine.rerank(query=r["query"], docs=r["documents"]) for r in workload))
        elapsed = time.perf_counter() - start
    print(json.dumps({"pairs_per_s": sum(len(r["documents"]) for r in workload) / elapsed}))


if __name__ == "__main__":
    try:
        with open(sys.argv[2]) as f:
            asyncio.run(main(json.load(f)))
    except Exception as error:  # noqa: BLE001 - report why, so the benchmark can say so
        # The last line of a chained import failure names the root cause.
        cause = [line for line in str(error).splitlines() if line.strip()][-1:] or [""]
        print(json.dumps({"error": f"{type(error).__name__}: {cause[0]}"[:300]}))
