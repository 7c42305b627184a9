"""``twostage index build``."""

from pathlib import Path

from twostage.cli.args import positive_int


def register(commands) -> None:
    parser = commands.add_parser("index", help="build recall indexes")
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser(
        "build", help="embed a corpus into an HNSW index with a SQLite document store",
        description="Each line is a JSON object: _id (or id), title, text; every other field, and the fields of a "
        "'metadata' object, become the document's metadata (strings, numbers, booleans, lists of strings). "
        "The corpus is checked as Upsert would check it before anything is embedded.",
    )
    build.add_argument("--corpus", type=Path, required=True, help="BEIR directory or JSONL (_id, title, text)")
    build.add_argument("--out", type=Path, required=True, help="new index directory")
    build.add_argument("--model", default=None, help="model name or directory (default: the recall server's)")
    build.add_argument("--limit", type=positive_int, default=None, help="index only the first N documents")
    build.add_argument("--shards", type=positive_int, default=1,
                       help="split into N shards (out/shard-0 ...), one recall server each")
    build.add_argument("--skip-invalid", action="store_true",
                       help="index the valid documents and report the invalid lines (default: refuse the corpus)")
    build.add_argument("--max-length", type=positive_int, default=None, help="tokens read per document")
    build.add_argument("--max-batch-size", type=positive_int, default=None, help="documents per model call")
    build.add_argument("--max-batch-tokens", type=positive_int, default=None, help="padded tokens per model call")
    build.set_defaults(run=_build)
    repair = actions.add_parser(
        "repair", help="rebuild an index's HNSW graph from its document store (after a lost or torn graph file)"
    )
    repair.add_argument("--index-dir", type=Path, required=True)
    repair.set_defaults(run=_repair)


def _build(args) -> None:
    from recall_server.build import build_from_corpus

    model = {"model": args.model} if args.model else {}
    report = build_from_corpus(args.corpus, args.out, limit=args.limit, max_length=args.max_length,
                               max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                               shards=args.shards, skip_invalid=args.skip_invalid, **model)
    skipped = f"; skipped {report.skipped_lines} invalid lines" if report.skipped_lines else ""
    print(f"indexed {report.documents} documents into {args.out}{skipped}")


def _repair(args) -> None:
    from recall_server.index import repair_index

    print(f"rebuilt the graph of {args.index_dir}: {repair_index(args.index_dir)} documents")
