"""``twostage eval``: nDCG, MRR and recall of every stage on a BEIR data set."""

import asyncio
from pathlib import Path

from twostage.cli.args import at_least_two
from twostage.connect import PLAINTEXT, add_credential_flags, credentials_from_args
from twostage.corpus import DEMO_CORPUS
from twostage.recall_mode import RecallMode
from twostage.scoring import Fusion


def register(commands) -> None:
    parser = commands.add_parser("eval", help="quality and latency of recall, rerank and the final ranking")
    parser.add_argument("--dataset", type=Path, default=DEMO_CORPUS, help="BEIR directory (default: the demo slice)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--target", default=None, help="a running gateway; without it a local stack is started")
    parser.add_argument("--recall-target", default=None, help="its recall server, for the recall_k advice")
    parser.add_argument("--recall-k", type=int, default=100)
    parser.add_argument("--budget-ms", type=int, default=600_000, help="large by default: measure quality, not cuts")
    parser.add_argument("--limit", type=int, default=None, help="only the first N queries")
    parser.add_argument("--fusion", default=Fusion.LINEAR.value, choices=[f.value for f in Fusion],
                        help="the fusion the alpha sweep recomputes")
    parser.add_argument("--recall-mode", default=None, type=RecallMode, choices=list(RecallMode),
                        help="how recall finds candidates (default: the recall servers' setting)")
    parser.add_argument("--stages", default="all", choices=["all", "recall"],
                        help="recall: evaluate recall alone, without reranking (seconds, not minutes)")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                        help="recall_k=20,50,100, alpha=0,0.5,0.7,1, recall_mode=dense,lexical,hybrid, "
                        "prf_depth=0,3,5, prf_weight=0.3,0.5,0.7 (pseudo-relevance feedback, per request) and/or "
                        "max_length=128,192,256,384 (the reranker's truncation; restarts the local stack per length) "
                        "(repeatable)")
    parser.add_argument("--tune", default=None, metavar="NAME,...",
                        help="search these settings (alpha, prf_depth, prf_weight) on the split's queries, report the "
                        "gain held out by cross-validation over queries beside the in-sample gain, and write the "
                        "best to --tune-out if it beats the defaults held out")
    parser.add_argument("--tune-grid", action="append", default=[], metavar="NAME=V1,V2",
                        help="the values --tune searches for a name (default: alpha=0.3,...,0.7, prf_depth=0,3,5,8, "
                        "prf_weight=0.3,0.5,0.7) (repeatable)")
    parser.add_argument("--tune-out", type=Path, default=Path("tuned.env"),
                        help="the settings file --tune writes (serve it with --settings-file)")
    parser.add_argument("--folds", type=at_least_two, default=5,
                        help="cross-validation folds over queries for --tune (at least 2)")
    parser.add_argument("--settings-file", type=Path, default=None,
                        help="settings for the local stack (what --tune wrote)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the sweeps")
    parser.add_argument("--port", type=int, default=50261, help="base port of the local stack")
    parser.add_argument("--index-dir", type=Path, default=None,
                        help="the local stack's index of the data set: built there when absent, reused when present "
                        "(default: a cache, ~/.cache/twostage/eval-indexes/NAME-HASH)")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="index the data set's valid documents and report the invalid ones, such as empty "
                        "documents (default: refuse the corpus)")
    add_credential_flags(parser)
    parser.set_defaults(run=run)


def parse_sweeps(items: list[str]) -> dict[str, list]:
    sweeps: dict[str, list] = {}
    for item in items:
        name, _, values = item.partition("=")
        if name not in ("recall_k", "alpha", "recall_mode", "max_length", "prf_depth", "prf_weight") or not values:
            raise ValueError(f"--sweep takes recall_k=..., alpha=..., recall_mode=..., prf_depth=..., prf_weight=... "
                             f"or max_length=..., got {item!r}")
        if name == "recall_mode":
            modes = values.split(",")
            known = tuple(m.value for m in RecallMode)
            if unknown := [m for m in modes if m not in known]:
                raise ValueError(f"--sweep recall_mode: unknown {', '.join(unknown)}; choose from {known}")
            sweeps[name] = [RecallMode(m) for m in modes]
        elif name in ("max_length", "prf_depth"):
            sweeps[name] = [int(v) for v in values.split(",")]
        else:
            sweeps[name] = [float(v) for v in values.split(",")]
    return sweeps


def reachable_cutoffs(row: dict, recall_k: int) -> list[str]:
    """The recall@c columns that recall_k candidates can reach (c <= recall_k)."""
    return [key for key in row if key.startswith("recall@") and int(key.split("@")[1]) <= recall_k]


def print_report(report: dict) -> None:
    recall_alone = report.get("stages") == "recall"
    cutoffs = reachable_cutoffs(report["recall"], report["recall_k"])
    mode = report["recall_mode"]
    header = f"recall mode {mode}" if mode != "server default" else "recall mode: the recall servers' default"
    if "sweep_recall_mode" in report:
        header += f" (the modes compared, {', '.join(report['sweep_recall_mode'])}, are below)"
    print(f"\n{report['queries']} queries, recall_k={report['recall_k']}, {header}"
          + (", recall alone" if recall_alone else ""))
    print(f"  {'ranking':10} {'nDCG@10':>8} {'MRR@10':>8} " + " ".join(f"{c:>11}" for c in cutoffs))
    for name in ("recall",) if recall_alone else ("recall", "rerank", "final"):  # without rerank all three agree
        row = report[name]
        print(f"  {name:10} {row['ndcg@10']:8.4f} {row['mrr@10']:8.4f} " + " ".join(f"{row[c]:11.4f}" for c in cutoffs))
    print(f"  latency: mean {report['latency_ms']['mean']:.1f} ms, p95 {report['latency_ms']['p95']:.1f} ms; "
          f"degraded: {report['degraded'] or 'none'}"
          + ("" if recall_alone else f"; pairs reranked per query: {report['mean_reranked']}"))
    if not recall_alone:
        depth = {span: n for span, n in report["promotion_depth"].items() if int(span.split("-")[0]) <= report["recall_k"]}
        print("  final top-10 by recall position:")
        print("    " + " ".join(f"{span:>9}" for span in depth))
        print("    " + " ".join(f"{n:>9}" for n in depth.values()))
    if "advice" in report:
        print(f"  {report['advice']}")
    if "calibration" in report:
        print("  calibrated fusion, the same answers with each set of constants (cosine, BM25 logits per unit):")
        for name, row in report["calibration"].items():
            label = "in use (fitted from the index)" if name == "in_use" else "built in (fitted on SciFact)"
            print(f"    {label:30} {row['scale']:6.1f} x (c - {row['center']:.3f}), {row['lexical_scale']:.2f} x "
                  f"(b - {row['lexical_center']:.2f}): final nDCG@10 {row['final_ndcg@10']:.4f}")
    for k, row in report.get("sweep_recall_k", {}).items():
        print(f"  recall_k={k:>5}: final nDCG@10 {row['final_ndcg@10']:.4f}, Recall@k {row['recall@k']:.4f}, "
              f"mean latency {row['mean_latency_ms']:.1f} ms")
    for alpha, ndcg in report.get("sweep_alpha", {}).items():
        print(f"  alpha={alpha}: nDCG@10 {ndcg:.4f}")
    for length, row in report.get("sweep_max_length", {}).items():
        print(f"  max_length={length:>4}: final nDCG@10 {row['final_ndcg@10']:.4f}, rerank alone "
              f"{row['rerank_ndcg@10']:.4f}, {row['pairs_per_s']:.1f} pairs/s (one query at a time)")
    for name in ("prf_depth", "prf_weight"):
        for value, row in report.get(f"sweep_{name}", {}).items():
            recall_at = next(key for key in row if key.startswith("recall@"))
            cost = f", feedback p50 {row['prf_p50_ms']:.1f} ms" if row["prf_p50_ms"] is not None else ""
            final = "" if recall_alone else f"; final nDCG@10 {row['final_ndcg@10']:.4f}"
            print(f"  {name}={value}: recall nDCG@10 {row['ndcg@10']:.4f}, {recall_at.capitalize()} "
                  f"{row[recall_at]:.4f}{final}, mean latency {row['mean_latency_ms']:.1f} ms{cost}")
    if report.get("prf", {}).get("answers"):
        print(f"  pseudo-relevance feedback ran for {report['prf']['answers']} of {report['queries']} answers, "
              f"p50 {report['prf']['p50_ms']:.1f} ms")
    if "tune" in report:
        print_tuning(report["tune"])
    for mode, row in report.get("sweep_recall_mode", {}).items():
        recalls = ", ".join(f"Recall@{c.split('@')[1]} {row[c]:.4f}" for c in ("recall@10", "recall@20", "recall@100")
                            if c in row)
        print(f"  {mode:>8}: recall nDCG@10 {row['ndcg@10']:.4f}, {recalls}; final nDCG@10 "
              f"{row['final_ndcg@10']:.4f}, mean latency {row['mean_latency_ms']:.1f} ms")
        if "advice" in row:
            print(f"            {row['advice']}")


def print_tuning(tuned: dict) -> None:
    print(f"  tuning {', '.join(tuned['names'])} over {len(tuned['combinations'])} combinations, "
          f"{tuned['folds']}-fold cross-validation over {tuned['queries']} queries (final nDCG@10):")
    best = ", ".join(f"{name}={value:g}" for name, value in tuned["best"].items()) or "the defaults"
    print(f"    defaults {tuned['default_ndcg@10']:.4f}; best in sample ({best}) {tuned['in_sample_ndcg@10']:.4f} "
          f"({tuned['in_sample_gain']:+.4f}); held out {tuned['held_out_ndcg@10']:.4f} "
          f"({tuned['held_out_gain']:+.4f})")
    print(f"    chosen per fold: {'; '.join(tuned['chosen_per_fold'])}")
    print(f"    settings file: {tuned['outcome']}")


def run(args) -> None:
    from twostage.evaluation.eval_run import run as evaluate
    from twostage.evaluation.eval_run import serve_and_measure, sweep_max_length, write_report
    from twostage.evaluation.tuning import parse_tune, tune, write_if_better

    sweeps = parse_sweeps(args.sweep)
    grids = parse_tune(args.tune, args.tune_grid) if args.tune else None
    if args.settings_file and args.target:
        raise SystemExit("twostage: error: --settings-file configures the local stack: leave out --target (a running "
                         "stack reads it with 'twostage serve ... --settings-file')")
    if args.settings_file:
        from twostage.cli.config import check_settings_file

        check_settings_file(args.settings_file)

    def measure(target: str, recall_target: str | None) -> dict:
        # A local stack is plaintext; credentials are for a running one.
        credentials = credentials_from_args(args) if args.target else PLAINTEXT
        report = evaluate(target, recall_target, args.dataset, args.split, args.recall_k, args.budget_ms, args.limit,
                          [int(k) for k in sweeps.get("recall_k", [])], sweeps.get("alpha", []), Fusion(args.fusion),
                          credentials=credentials, recall_mode=args.recall_mode, stages=args.stages,
                          sweep_recall_mode=sweeps.get("recall_mode", []),
                          sweep_prf={name: sweeps[name] for name in ("prf_depth", "prf_weight") if name in sweeps})
        if grids:
            from twostage.evaluation.eval_run import load

            queries, qrels = load(args.dataset, args.split, args.limit)
            report["tune"] = tune(target, queries, qrels, args.recall_k, args.budget_ms, grids,
                                  args.folds, credentials)
            report["tune"]["outcome"] = write_if_better(report["tune"], args.tune_out, args.dataset.name, args.split,
                                                        args.recall_k)
        return report

    if "max_length" in sweeps and args.target:
        raise SystemExit("twostage: error: --sweep max_length restarts the rerank server, so it needs the local "
                         "stack: leave out --target")
    if args.target:
        report = measure(args.target, args.recall_target)
    else:
        report = asyncio.run(serve_and_measure(args.dataset, args.port, measure, args.index_dir, args.settings_file,
                                               args.skip_invalid))
    if "max_length" in sweeps:
        report["sweep_max_length"] = sweep_max_length(args.dataset, args.split, args.limit, args.recall_k,
                                                      args.budget_ms, args.recall_mode, args.port,
                                                      sweeps["max_length"], args.skip_invalid)
    print_report(report)
    write_report(args.json, report)
    if args.plot:
        from twostage.evaluation.plots import plot_eval

        plot_eval(report, args.plot)
        print(f"  plot: {args.plot}")
