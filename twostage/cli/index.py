"""``twostage index build``."""

from pathlib import Path

from twostage.config import RuntimeSettings
from twostage.model_store import DEFAULT_EMBED_MODEL, resolve_model


def register(commands) -> None:
    parser = commands.add_parser("index", help="build recall indexes")
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="embed a corpus into an HNSW index with a SQLite document store")
    build.add_argument("--corpus", type=Path, required=True, help="BEIR directory or JSONL (_id, title, text)")
    build.add_argument("--out", type=Path, required=True, help="new index directory")
    build.add_argument("--model", default=DEFAULT_EMBED_MODEL, help="default model name or model directory")
    build.add_argument("--limit", type=int, default=None, help="index only the first N documents")
    build.add_argument("--shards", type=int, default=1, help="split into N shards (out/shard-0 ...), one recall server each")
    build.add_argument("--max-length", type=int, default=None, help="tokens read per document")
    build.add_argument("--max-batch-size", type=int, default=None, help="default 32")
    build.add_argument("--max-batch-tokens", type=int, default=None, help="default 4096: 8 long documents per call")
    build.set_defaults(run=_build)


def _build(args) -> None:
    count = build_from_corpus(args.corpus, args.out, args.model, args.limit, args.max_length,
                              args.max_batch_size, args.max_batch_tokens, args.shards)
    print(f"indexed {count} documents into {args.out}")


def build_from_corpus(corpus: Path, out: Path, model: str = DEFAULT_EMBED_MODEL, limit: int | None = None,
                      max_length: int | None = None, max_batch_size: int | None = None,
                      max_batch_tokens: int | None = None, shards: int = 1) -> int:
    from dataclasses import replace

    from recall_server.build import DEFAULT_BUILD_POLICY, build_index
    from recall_server.embedder import Embedder

    embedder = Embedder(resolve_model(model), RuntimeSettings(), max_length)
    policy = replace(
        DEFAULT_BUILD_POLICY,
        max_batch_size=max_batch_size or DEFAULT_BUILD_POLICY.max_batch_size,
        max_batch_tokens=max_batch_tokens or DEFAULT_BUILD_POLICY.max_batch_tokens,
    )
    return build_index(corpus, out, embedder, policy, limit=limit, shards=shards)
