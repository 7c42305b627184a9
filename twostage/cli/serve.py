"""``twostage serve recall|rerank|gateway|all``."""

import argparse
import asyncio
import sys

from twostage.cli.args import port_number, positive_int
from twostage.config import add_settings_flags, settings_from_args
from twostage.server import serve_until_signal
from twostage.stack import Interrupted, Stack


def register(commands) -> None:
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings
    from rerank_server.config import RerankSettings

    parser = commands.add_parser("serve", help="run a service in the foreground until SIGTERM or Ctrl-C")
    services = parser.add_subparsers(dest="service", required=True)
    for name, settings_cls, run in (
        ("recall", RecallSettings, _serve_recall),
        ("rerank", RerankSettings, _serve_rerank),
        ("gateway", GatewaySettings, _serve_gateway),
    ):
        sub = services.add_parser(name, help=f"the {name} server")
        add_settings_file_flag(sub)
        add_settings_flags(sub, settings_cls)
        sub.set_defaults(run=run, settings_cls=settings_cls)
    stack = services.add_parser("all", help="recall, rerank and gateway as separate processes")
    add_stack_flags(stack)
    stack.set_defaults(run=serve_all)


def add_settings_file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings-file", default=None,
                        help="settings as environment variables, NAME=VALUE a line (what 'twostage eval --tune' "
                        "writes); environment variables and flags override it")


def add_stack_flags(parser: argparse.ArgumentParser) -> None:
    add_settings_file_flag(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=50051, help="gateway port; recall and rerank take the next ones")
    parser.add_argument("--index-dir", default=None, help="recall index (default: the demo index)")
    parser.add_argument("--recall-shards", type=positive_int, default=1,
                        help="recall processes, one per index shard (INDEX_DIR/shard-i, from 'index build --shards')")
    parser.add_argument("--shard-replicas", type=positive_int, default=1,
                        help="recall processes per shard; the gateway spreads searches over them and sends every "
                        "write to each (replicas after the first serve a copy of the shard made for the run)")
    parser.add_argument("--rerank-replicas", type=positive_int, default=1, help="rerank processes, each on its own port")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--metrics-port", type=port_number, default=0,
                        help="Prometheus ports from here: gateway, then recall shards, then rerank replicas (0: off)")
    parser.add_argument("--embed-model", default=None, help="recall's model name or directory (default: the recall server's)")
    parser.add_argument("--rerank-model", default=None,
                        help="rerank's model name or directory (default: the rerank server's)")
    parser.add_argument("--tls-dir", default=None,
                        help="TLS on every hop from this directory ('twostage certs dev'); the stages require the "
                        "gateway's client certificate")
    parser.add_argument("--http-port", type=port_number, default=None,
                        help="also serve HTTP/JSON from the gateway on this port: /v1/search, /v1/documents, and "
                        "TEI's, Cohere's and OpenAI's rerank and embedding routes (default: off)")
    parser.add_argument("--auth-tokens", default=None,
                        help="tokens file ('twostage auth add-token'): callers need a token; the gateway uses one "
                        "of its own, made for this run, toward the stages")


def _serve_recall(args) -> None:
    from recall_server.service import RecallService
    from recall_server.servicer import build_server

    settings = settings_from_args(args.settings_cls, args)
    asyncio.run(serve_until_signal(lambda: build_server(RecallService(settings)), "recall"))


def _serve_rerank(args) -> None:
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server

    settings = settings_from_args(args.settings_cls, args)
    asyncio.run(serve_until_signal(lambda: build_server(RerankService(settings)), "rerank"))


def _serve_gateway(args) -> None:
    from gateway.servicer import build_server

    settings = settings_from_args(args.settings_cls, args)
    asyncio.run(serve_until_signal(lambda: build_server(settings), "gateway"))


def serve_all(args) -> int:
    if args.settings_file:  # checked once, before any process starts (each reads its own lines)
        from twostage.cli.config import check_settings_file

        check_settings_file(args.settings_file)
    return asyncio.run(run_stack(args))


async def run_stack(args, then=None) -> int:
    """Run the stack until a signal or a child's exit; ``then(stack)`` runs once it is ready
    (with ``args.once`` the stack stops after it). A child that dies takes the stack down, named.
    SIGTERM, SIGINT and SIGHUP stop it (a clean stop is success)."""
    stack = Stack(args.host, args.port, args.index_dir, args.rerank_replicas, args.recall_shards,
                  args.metrics_port, args.embed_model, args.rerank_model, args.tls_dir, args.auth_tokens,
                  args.shard_replicas, getattr(args, "http_port", None), args.settings_file)
    died = None
    try:
        async with stack.running(args.ready_timeout_s):
            metrics = stack.metrics_ports()
            http = f" (HTTP/JSON on http://{stack.host}:{stack.http_port})" if stack.http_port else ""
            print(f"twostage is serving: gateway {stack.gateway_target}{http}, recall "
                  f"{', '.join(stack.recall_targets)}, rerank {', '.join(stack.rerank_targets)}"
                  + (f"; metrics on ports {', '.join(str(p) for p in metrics.values())}" if metrics else ""),
                  flush=True)
            if then is not None:
                await then(stack)
            if not getattr(args, "once", False):
                print("press Ctrl-C to stop", flush=True)
                died = await stack.wait_any_exit()
                print(f"twostage: error: {died.exit_description()}; stopping the stack", file=sys.stderr, flush=True)
    except Interrupted:
        pass
    return 1 if died is not None else stack.exit_code
