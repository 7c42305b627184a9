"""``twostage demo``: fetch models, build the demo index, serve, answer a query."""

import asyncio
import os
from pathlib import Path

from twostage.cli.serve import add_stack_flags, run_stack
from twostage.connect import Credentials
from twostage.corpus import DEMO_CORPUS

SAMPLE_QUERY = "A deficiency of vitamin B12 increases blood levels of homocysteine."


def register(commands) -> None:
    parser = commands.add_parser("demo", help="the whole product on the shipped SciFact slice")
    add_stack_flags(parser)
    parser.add_argument("--query", default=SAMPLE_QUERY)
    parser.add_argument("--once", action="store_true", help="answer the query, then stop (default: keep serving)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the demo index even if it exists")
    parser.set_defaults(run=run)


def prepare(index_dir: Path, rebuild: bool) -> None:
    import shutil

    from recall_server.build import build_from_corpus
    from twostage.model_store import fetch_defaults

    fetch_defaults()
    if rebuild:
        shutil.rmtree(index_dir, ignore_errors=True)
    if not (index_dir / "index.json").exists():
        print(f"building the demo index from {DEMO_CORPUS} into {index_dir}", flush=True)
        shutil.rmtree(index_dir, ignore_errors=True)
        build_from_corpus(DEMO_CORPUS, index_dir)
    else:
        print(f"demo index: {index_dir} (--rebuild to rebuild)", flush=True)


def run(args) -> int:
    from recall_server.config import RecallSettings
    from twostage.cli.search import format_response, search
    from twostage.v1 import gateway_pb2

    index_dir = Path(args.index_dir) if args.index_dir else RecallSettings().index_dir
    prepare(index_dir, args.rebuild)
    args.index_dir = str(index_dir)

    async def answer(stack) -> None:
        request = gateway_pb2.SearchRequest(query=args.query)
        # With --auth-tokens the sample query needs a token of yours: TWOSTAGE_TOKEN.
        credentials = Credentials(args.tls_dir, os.environ.get("TWOSTAGE_TOKEN") or None)
        response = await asyncio.to_thread(search, stack.gateway_target, request, 120.0, credentials)
        print(f"\nquery: {args.query}\n{format_response(response)}\n", flush=True)
        print(f"try: twostage search \"<your query>\" --target {stack.gateway_target} [--json]", flush=True)

    return asyncio.run(run_stack(args, then=answer))
