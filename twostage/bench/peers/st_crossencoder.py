"""Peer: sentence-transformers CrossEncoder with its ONNX backend, as a Python
user would write it. Runs in .venv-peers; prints {"pairs_per_s": ...}.

    python st_crossencoder.py MODEL_DIR WORKLOAD_JSON MAX_LENGTH
"""

import json
import sys
import time


def main() -> None:
    model_dir, workload_file, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(model_dir, backend="onnx", max_length=max_length, local_files_only=True)
    with open(workload_file) as f:
        workload = json.load(f)
    pairs = [(r["query"], d) for r in workload for d in r["documents"]]
    model.predict(pairs[:8])  # warm-up
    start = time.perf_counter()
    model.predict(pairs)
    print(json.dumps({"pairs_per_s": len(pairs) / (time.perf_counter() - start)}))


if __name__ == "__main__":
    main()
