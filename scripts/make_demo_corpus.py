"""Cut the demo corpus shipped in twostage/data/scifact-demo from BEIR SciFact.

    python scripts/make_demo_corpus.py ../shared/datasets/scifact

Keeps every document judged relevant for a test query, fills up to 1,000
documents with a fixed random sample of the rest, and keeps every test query
(all of their relevant documents are in the slice).
"""

import argparse
import json
import random
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "twostage" / "data" / "scifact-demo"
SIZE = 1000
SEED = 2020


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scifact", type=Path)
    args = parser.parse_args()
    with open(args.scifact / "corpus.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    qrel_lines = (args.scifact / "qrels" / "test.tsv").read_text().splitlines()
    relevant = {line.split("\t")[1] for line in qrel_lines[1:]}
    others = sorted(r["_id"] for r in rows if r["_id"] not in relevant)
    keep = relevant | set(random.Random(SEED).sample(others, SIZE - len(relevant)))
    (OUT / "qrels").mkdir(parents=True, exist_ok=True)
    with open(OUT / "corpus.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            if row["_id"] in keep:
                f.write(json.dumps({"_id": row["_id"], "title": row["title"], "text": row["text"]}) + "\n")
    shutil.copy(args.scifact / "queries.jsonl", OUT / "queries.jsonl")
    shutil.copy(args.scifact / "qrels" / "test.tsv", OUT / "qrels" / "test.tsv")
    print(f"{len(keep)} documents ({len(relevant)} relevant) written to {OUT}")


if __name__ == "__main__":
    main()
