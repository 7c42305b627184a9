"""``twostage index build``."""

from pathlib import Path

from twostage.cli.args import non_negative_int, positive_int
from twostage.errors import InvalidArgument
from twostage.wording import count_of


def register(commands) -> None:
    parser = commands.add_parser("index", help="build recall indexes")
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser(
        "build", help="embed a corpus into an HNSW index with a SQLite document store",
        description="Each line is a JSON object: _id (or id), title, text; every other field, and the fields of a "
        "'metadata' object, become the document's metadata (strings, numbers, booleans, lists of strings). "
        "The corpus is checked as Upsert would check it before anything is embedded.",
    )
    build.add_argument("--corpus", required=True,
                       help="BEIR directory or JSONL (_id, title, text), a path or an http(s):// URL (s3:// and "
                       "gs:// with fsspec installed)")
    build.add_argument("--out", type=Path, default=None, help="new index directory (or --snapshot-dir)")
    build.add_argument("--model", default=None, help="model name or directory (default: the recall server's)")
    build.add_argument("--limit", type=positive_int, default=None, help="index only the first N documents")
    build.add_argument("--shards", type=positive_int, default=1,
                       help="split into N shards (out/shard-0 ...), one recall server each")
    build.add_argument("--shard-index", type=non_negative_int, default=None,
                       help="build only this shard of --shards (one job per shard; in a Kubernetes Indexed Job, "
                       "$(JOB_COMPLETION_INDEX))")
    build.add_argument("--parts", type=positive_int, default=1,
                       help="with --snapshot-dir: build each shard as P parts on P machines; the last part to "
                       "finish merges them (stored vectors, no re-embedding) and publishes the shard")
    build.add_argument("--part-index", type=non_negative_int, default=0, help="which part of the shard to build")
    build.add_argument("--task-index", type=non_negative_int, default=None,
                       help="shard and part from one number K (shard K // parts, part K %% parts): the completion "
                       "index of a Kubernetes Indexed Job with shards x parts completions")
    build.add_argument("--snapshot-dir", type=Path, default=None,
                       help="publish the shard as a snapshot SNAPSHOT_DIR/shard-I/VERSION for recall servers started "
                       "with --snapshot-dir (needs --shard-index; instead of --out)")
    build.add_argument("--version", default=None,
                       help="the snapshot's version (default: the UTC time, e.g. 20261125T210000Z); newer "
                       "snapshots replace older ones in serving")
    build.add_argument("--skip-invalid", action="store_true",
                       help="index the valid documents and report the invalid lines (default: refuse the corpus)")
    build.add_argument("--metadata-schema", type=_schema_arg, default=None, metavar="JSON",
                       help='declare metadata types, e.g. \'{"price": "number", "tags": "string_list"}\' (string, '
                       "number, bool, string_list); other keys take the type of their first value")
    build.add_argument("--max-length", type=positive_int, default=None, help="tokens read per document")
    build.add_argument("--max-batch-size", type=positive_int, default=None, help="documents per model call")
    build.add_argument("--max-batch-tokens", type=positive_int, default=None, help="padded tokens per model call")
    build.set_defaults(run=_build)
    repair = actions.add_parser(
        "repair", help="rebuild an index's HNSW graph from its document store (after a lost or torn graph file)"
    )
    repair.add_argument("--index-dir", type=Path, required=True)
    repair.set_defaults(run=_repair)


def _schema_arg(text: str) -> dict[str, str]:
    import argparse
    import json

    from twostage.schema import check_declared

    try:
        declared = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(declared, dict):
        raise argparse.ArgumentTypeError('expected a JSON object such as {"price": "number"}')
    try:
        return check_declared(declared)
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def describe_schema(schema: dict[str, str]) -> str:
    return ", ".join(f"{key} ({kind})" for key, kind in sorted(schema.items())) or "none (no metadata)"


def _build(args) -> None:
    from recall_server.build import build_from_corpus, build_snapshot, local_corpus

    if (args.out is None) == (args.snapshot_dir is None):
        raise InvalidArgument("give either --out (an index directory) or --snapshot-dir (publish a snapshot)")
    if args.task_index is not None:
        if args.shard_index is not None or args.part_index:
            raise InvalidArgument("give --task-index or --shard-index/--part-index, not both")
        if args.task_index >= args.shards * args.parts:
            raise InvalidArgument(f"--task-index {args.task_index} is beyond --shards x --parts "
                                  f"({args.shards * args.parts} tasks, 0 to {args.shards * args.parts - 1})")
        args.shard_index, args.part_index = divmod(args.task_index, args.parts)
    if args.snapshot_dir is not None and args.shard_index is None:
        raise InvalidArgument("--snapshot-dir publishes one shard: give --shard-index (0 with --shards 1)")
    if args.parts > 1 and args.snapshot_dir is None:
        raise InvalidArgument("--parts builds parts that merge into a snapshot: give --snapshot-dir")
    options = dict(limit=args.limit, max_length=args.max_length, max_batch_size=args.max_batch_size,
                   max_batch_tokens=args.max_batch_tokens, skip_invalid=args.skip_invalid, schema=args.metadata_schema,
                   **({"model": args.model} if args.model else {}))
    with local_corpus(args.corpus) as corpus:
        if args.snapshot_dir is not None:
            report, where = build_snapshot(corpus, args.snapshot_dir, args.shards, args.shard_index, args.version,
                                           args.parts, args.part_index, **options)
            if where is None:
                print(f"built part {args.part_index} of shard {args.shard_index} ({report.documents} documents); "
                      "the last part to finish publishes the shard")
                return
        else:
            report = build_from_corpus(corpus, args.out, shards=args.shards, shard_index=args.shard_index, **options)
            where = args.out
    skipped = f"; skipped {count_of(report.skipped_lines, 'invalid line')}" if report.skipped_lines else ""
    print(f"indexed {count_of(report.documents, 'document')} into {where}{skipped}")
    print(f"metadata schema: {describe_schema(report.schema)}")


def _repair(args) -> None:
    from recall_server.index import repair_index

    print(f"rebuilt the graph of {args.index_dir}: {repair_index(args.index_dir)} documents")
