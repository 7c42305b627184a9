"""``twostage loadtest``: open-loop load at a fixed rate, or stepped up to an SLO."""

import asyncio
import json
import sys
from pathlib import Path

from twostage.cli.args import non_negative_float, non_negative_int, positive_float, positive_int
from twostage.cli.client import add_target_flag
from twostage.connect import credentials_from_args
from twostage.corpus import DEMO_CORPUS


def register(commands) -> None:
    parser = commands.add_parser("loadtest", help="open-loop load on a gateway or one stage")
    add_target_flag(parser, what="gateway (or, with --stage, recall or rerank)")
    parser.add_argument("--stage", choices=["gateway", "recall", "rerank"], default="gateway")
    parser.add_argument("--queries", type=Path, default=DEMO_CORPUS / "queries.jsonl",
                        help="BEIR queries.jsonl or a text file with one query per line")
    parser.add_argument("--zipf", type=non_negative_float, default=None, metavar="S",
                        help="replay --queries with Zipf(S) repetition: the i-th query is sent with probability "
                        "proportional to 1/i^S (0: uniform at random); without it queries go round in order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --zipf draw")
    parser.add_argument("--rate-rps", type=positive_float, default=2.0)
    parser.add_argument("--duration-s", type=positive_float, default=30.0, help="at most 600")
    parser.add_argument("--max-requests", type=positive_int, default=10_000)
    parser.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of a constant rate")
    parser.add_argument("--step", default=None, metavar="R1,R2,...",
                        help="step mode: these rates in turn, each for --duration-s, until the SLO breaks")
    parser.add_argument("--slo-p99-ms", type=float, default=None, help="step mode: p99 limit (default: the budget)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="hits per answer (0: server default)")
    parser.add_argument("--recall-k", type=non_negative_int, default=0,
                        help="candidates per search (0: server default; required with --stage recall)")
    parser.add_argument("--budget-ms", type=non_negative_int, default=0, help="gateway budget (0: server default)")
    parser.add_argument("--documents", type=positive_int, default=20, help="rerank stage: documents per request")
    parser.add_argument("--timeout-s", type=positive_float, default=30.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG: latency over time and its CDF (step mode: rate and p99 by step)")
    parser.set_defaults(run=run)


def load_queries(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        from twostage.corpus import read_queries

        return list(read_queries(path).values())
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def rerank_documents(count: int) -> list[str]:
    from itertools import islice

    from twostage.corpus import document_text, read_corpus

    return [document_text(d) for d in islice(read_corpus(DEMO_CORPUS), count)]


def run(args) -> int:
    from twostage.evaluation.loadtest import find_max_rate, run_load

    queries = load_queries(args.queries)
    if args.zipf is not None:
        from twostage.evaluation.loadtest import zipf_stream

        queries = zipf_stream(queries, args.max_requests, args.zipf, args.seed)
        print(f"Zipf({args.zipf:g}) stream: {len(set(queries))} distinct queries in the first {len(queries)}",
              file=sys.stderr)
    common = {
        "poisson": args.poisson, "timeout_s": args.timeout_s, "top_k": args.top_k, "recall_k": args.recall_k,
        "budget_ms": args.budget_ms,
        "documents": rerank_documents(args.documents) if args.stage == "rerank" else None,
        "credentials": credentials_from_args(args),
    }
    if args.step:
        rates = [float(r) for r in args.step.split(",")]
        slo = args.slo_p99_ms or float(args.budget_ms or 1000)
        report = asyncio.run(find_max_rate(args.target, args.stage, queries, rates, args.duration_s, slo, **common))
        for step in report["steps"]:
            hits = "" if step["score_cache_hit_rate"] is None else (
                f", score-cache hits {step['score_cache_hits']} ({100 * step['score_cache_hit_rate']:.0f}% of pairs)")
            print(f"  {step['offered_rps']:>8} rps: achieved {step['achieved_rps']}, p99 {step['p99_ms']} ms{hits}, "
                  f"errors {step['errors'] or 'none'}, degraded {step['degraded'] or 'none'}")
        print(f"highest rate with p99 <= {slo:g} ms, no errors and nothing degraded: "
              f"{report['max_sustainable_rps']} rps")
        if args.plot:
            from twostage.evaluation.plots import plot_steps

            plot_steps(report["steps"], slo, args.plot, f"{args.stage}: step load")
            print(f"plot: {args.plot}")
        outcomes = report["steps"]
    else:
        result = asyncio.run(
            run_load(args.target, args.stage, queries, args.rate_rps, args.duration_s, args.max_requests, **common)
        )
        report = result.report()
        print(json.dumps(report, indent=2))
        if args.plot:
            from twostage.evaluation.plots import plot_load

            plot_load(result.scheduled_s, result.latencies_ms, args.plot,
                      f"{args.stage} at {args.rate_rps:g} rps ({'Poisson' if args.poisson else 'constant'})")
            print(f"plot: {args.plot}")
        outcomes = [report]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if all(o["ok"] == 0 for o in outcomes):
        examples = "; ".join(f"{code}: {text}" for o in outcomes for code, text in o["error_examples"].items())
        print(f"twostage: error: every request failed ({examples})", file=sys.stderr)
        return 1
    return 0
