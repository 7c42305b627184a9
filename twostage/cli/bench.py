"""``twostage bench rerank|embed``: benchmarks as ratios to a ceiling measured in the same run."""

import asyncio
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser("bench", help="throughput and latency against the raw onnxruntime ceiling")
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind in ("rerank", "embed", "gateway", "resilience", "recall", "chaos", "http"):
        sub = kinds.add_parser(kind)
        sub.add_argument("--json", type=Path, default=None, help="write the report here")
        sub.add_argument("--quick", action="store_true", help="a reduced run, under a minute")
        sub.add_argument("--dataset", type=Path, default=None, help="BEIR directory (default: SciFact)")
        sub.add_argument(
            "--batch-invariant", choices=["true", "false"], default=None,
            help="override the runtime setting for the ceiling and the server alike",
        )
        sub.set_defaults(run={"rerank": _rerank, "embed": _embed, "gateway": _gateway, "resilience": _resilience,
                              "recall": _recall, "chaos": _chaos, "http": _http}[kind])
        if kind == "rerank":
            sub.add_argument("--queries", type=int, default=10, help="queries, each with --candidates documents")
            sub.add_argument("--candidates", type=int, default=50)
            sub.add_argument("--clients", type=int, default=8, help="concurrent gRPC clients at saturation")
            sub.add_argument("--requests", type=int, default=16, help="requests sent at saturation")
            sub.add_argument("--port", type=int, default=50161, help="server port (and metrics on the next)")
            sub.add_argument("--rounds", type=int, default=3,
                             help="the ceiling, the server and each peer take turns this many times (medians)")
        elif kind == "resilience":
            sub.add_argument("--rate-rps", type=float, default=10.0, help="recall searches per second")
            sub.add_argument("--resolve-period-s", type=float, default=1.0, help="the gateway's re-resolution period")
            sub.add_argument("--port", type=int, default=50191, help="base port of the stack it starts")
        elif kind == "embed":
            sub.add_argument("--docs", type=int, default=400)
            sub.add_argument("--rounds", type=int, default=3,
                             help="the stock graph, each plan and the build take turns this many times (medians)")
        elif kind == "chaos":
            sub.add_argument("--rounds", type=int, default=None, help="rounds of each fault type (quick: 1, else 3)")
            sub.add_argument("--hold-s", type=float, default=None, help="how long each fault lasts (quick: 2, else 5)")
            sub.add_argument("--seed", type=int, default=None, help="seeds the writes, searches and fault targets")
        elif kind == "http":
            sub.add_argument("--clients", type=int, default=16, help="concurrent callers at saturation")
            sub.add_argument("--port", type=int, default=50201, help="base port of the stack it starts")
        elif kind == "recall":
            sub.add_argument("--recall-k", type=int, default=100, help="candidates per search")
            sub.add_argument("--dims", type=int, default=384, help="dimensions of the synthetic filtered index")
        else:
            sub.add_argument("--recall-k", type=int, default=20, help="candidates per search")
            sub.add_argument("--budget-ms", type=int, default=1000)
            sub.add_argument("--port", type=int, default=50171, help="base port of the stack it starts")
            sub.add_argument("--only", choices=["tracing", "overhead"], default=None,
                             help="tracing: only what tracing costs (off, sampling 1.0 and 0.01, side by side); "
                             "overhead: only the gateway's overhead and its hops, plaintext and with TLS and tokens")
            sub.add_argument("--repeat", type=int, default=None,
                             help="repeats of the overhead and tracing measurements, each reported with their "
                             "median (quick: 2, else 3)")


def _apply_overrides(args) -> None:
    """Settings come from the environment, so the server process sees the same override."""
    import os

    if args.batch_invariant is not None:
        for prefix in ("TWOSTAGE_RERANK_", "TWOSTAGE_RECALL_"):
            os.environ[prefix + "BATCH_INVARIANT"] = args.batch_invariant


def _rerank(args) -> None:
    from twostage.bench.rerank import run

    _apply_overrides(args)
    asyncio.run(run(args))


def _embed(args) -> None:
    from twostage.bench.embed import run

    _apply_overrides(args)
    run(args)


def _gateway(args) -> None:
    from twostage.bench.gateway import run

    _apply_overrides(args)
    asyncio.run(run(args))


def _resilience(args) -> None:
    from twostage.bench.resilience import run

    _apply_overrides(args)
    asyncio.run(run(args))


def _recall(args) -> None:
    from twostage.bench.recall import run

    _apply_overrides(args)
    run(args)


def _chaos(args) -> None:
    from twostage.bench.chaos import run

    _apply_overrides(args)
    asyncio.run(run(args))


def _http(args) -> None:
    from twostage.bench.http import run

    _apply_overrides(args)
    asyncio.run(run(args))
