"""``twostage eval --tune``: fusion and feedback settings searched on a labeled split, and judged held out.

Every combination of the settings named is evaluated on the same queries. A
setting that recall applies (pseudo-relevance feedback) needs its own answers,
asked for through the gateway with the per-request fields (the rerank tier's
pair-score cache answers the pairs the combinations share); the fusion's alpha
is recomputed from those answers. The gain a search over many combinations
finds on the queries it searched flatters it, so the same search is judged by
cross-validation over queries: each fold's queries are ranked by the
combination that did best on the other folds. Only a combination whose
held-out gain over the defaults is positive is written, as a settings file
that ``twostage serve --settings-file`` reads.
"""

import asyncio
import itertools
import random
from dataclasses import dataclass
from pathlib import Path

from twostage.evaluation.metrics import ndcg_at

# Values searched when --tune-grid does not say. alpha: the weight of rerank in the gateway's fusion.
GRIDS: dict[str, list] = {
    "alpha": [0.3, 0.4, 0.5, 0.6, 0.7],
    "prf_depth": [0, 3, 5, 8],
    "prf_weight": [0.3, 0.5, 0.7],
}
CASTS = {"alpha": float, "prf_depth": int, "prf_weight": float}


def setting_of(name: str) -> tuple[type, str]:
    """(the settings class, its field) a tuned name is written as."""
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings

    return {"alpha": (GatewaySettings, "fusion_alpha"), "prf_depth": (RecallSettings, "prf_depth"),
            "prf_weight": (RecallSettings, "prf_weight")}[name]


def parse_tune(names: str, grids: list[str]) -> dict[str, list]:
    """``--tune alpha,prf_depth`` and ``--tune-grid prf_depth=0,3``: the values searched per name."""
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    if unknown := [name for name in chosen if name not in GRIDS]:
        raise ValueError(f"--tune: unknown {', '.join(unknown)}; choose from {', '.join(GRIDS)}")
    values = {name: list(GRIDS[name]) for name in chosen}
    for item in grids:
        name, _, listed = item.partition("=")
        if name not in values or not listed:
            raise ValueError(f"--tune-grid takes NAME=V1,V2 for a name given to --tune, got {item!r}")
        values[name] = [CASTS[name](v) for v in listed.split(",")]
    return values


@dataclass(frozen=True)
class Combination:
    """Values of the tuned settings; None: the serving default."""

    alpha: float | None = None
    prf_depth: int | None = None
    prf_weight: float | None = None

    def label(self) -> str:
        given = [f"{name}={value:g}" for name, value in self.__dict__.items() if value is not None]
        return ", ".join(given) or "defaults"


def recall_combinations(grids: dict[str, list]) -> list[tuple[int | None, float | None]]:
    """The (prf_depth, prf_weight) pairs that need answers of their own; a depth of 0 turns feedback off, so it
    is asked for once, whatever the weight."""
    pairs = []
    for depth, weight in itertools.product(grids.get("prf_depth", [None]), grids.get("prf_weight", [None])):
        pair = (depth, None) if depth == 0 else (depth, weight)
        if pair not in pairs:
            pairs.append(pair)
    return pairs


def best_values(combination: Combination, grids: dict[str, list]) -> dict[str, float]:
    """The tuned names' values in ``combination``, those it sets."""
    return {name: value for name in grids if (value := getattr(combination, name)) is not None}


def cross_validate(scores: dict[Combination, dict[str, float]], default: Combination, folds: int,
                   seed: int = 0) -> dict:
    """Per-query scores of every combination (the default's among them) -> the held-out mean: each fold's queries
    scored by the combination with the best mean over the other folds (ties go to the default, then to the
    first listed). Also the in-sample best over every query."""
    queries = sorted(scores[default])
    if len(queries) < 2:
        raise ValueError(f"--tune needs at least 2 queries with relevant documents to hold some out, got "
                         f"{len(queries)}")
    random.Random(seed).shuffle(queries)
    folds = max(2, min(folds, len(queries)))
    parts = [queries[i::folds] for i in range(folds)]

    def best(on: list[str]) -> Combination:
        order = list(scores)
        return max(order, key=lambda c: (sum(scores[c][q] for q in on) / len(on), c == default, -order.index(c)))

    held, chosen = {}, []
    for i, part in enumerate(parts):
        winner = best([q for j, other in enumerate(parts) if j != i for q in other])
        chosen.append(winner)
        held.update({q: scores[winner][q] for q in part})

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    in_sample = best(queries)
    return {"default": mean(scores[default].values()), "in_sample": mean(scores[in_sample].values()),
            "held_out": mean(held.values()), "best": in_sample, "chosen_per_fold": chosen, "folds": folds}


def per_query_ndcg(ranking: dict[str, list[str]], qrels: dict) -> dict[str, float]:
    return {q: ndcg_at(ids, qrels[q], 10) for q, ids in ranking.items()
            if any(g > 0 for g in qrels.get(q, {}).values())}


def tune(target: str, queries: dict[str, str], qrels: dict, recall_k: int, budget_ms: int,
         grids: dict[str, list], folds: int, credentials, progress: bool = True) -> dict:
    """Evaluate every combination; cross-validate; the report (what to write is decided by the caller)."""
    from twostage.evaluation.eval_run import ask_gateway, gateway_fusion, rankings

    # The constants the gateway's calibrated fusion uses: recomputing alpha with them is what a search would give.
    fusion, default_alpha, calibration = asyncio.run(gateway_fusion(target, credentials))
    answers = {}
    for depth, weight in [(None, None), *recall_combinations(grids)]:
        if (depth, weight) not in answers:
            answers[depth, weight] = asyncio.run(ask_gateway(target, queries, recall_k, budget_ms, progress,
                                                             credentials, prf_depth=depth, prf_weight=weight))
    default = Combination()
    # The gateway's own order at its own alpha: exactly what a search gets.
    scores = {default: per_query_ndcg(rankings(answers[None, None])["final"], qrels)}
    for (depth, weight), alpha in itertools.product(recall_combinations(grids), grids.get("alpha", [None])):
        combination = Combination(alpha, depth, weight)
        if alpha is None or alpha == default_alpha:
            scores[combination] = per_query_ndcg(rankings(answers[depth, weight])["final"], qrels)
        else:
            scores[combination] = per_query_ndcg(
                rankings(answers[depth, weight], fusion, alpha, calibration)["final"], qrels)
    return judge(scores, default, grids, folds)


def judge(scores: dict[Combination, dict[str, float]], default: Combination, grids: dict[str, list],
          folds: int) -> dict:
    """The tuning report from every combination's per-query scores: the in-sample best, and the search's gain
    held out (cross_validate)."""
    judged = cross_validate(scores, default, folds)
    return {
        "names": list(grids), "folds": judged["folds"], "queries": len(scores[default]),
        "default_ndcg@10": round(judged["default"], 4),
        # Nothing when the defaults did best; a name the combination leaves at the default (prf_weight beside a
        # prf_depth of 0, which turns feedback off whatever the weight) is not written.
        "best": {} if judged["best"] == default else best_values(judged["best"], grids),
        "in_sample_ndcg@10": round(judged["in_sample"], 4),
        "in_sample_gain": round(judged["in_sample"] - judged["default"], 4),
        "held_out_ndcg@10": round(judged["held_out"], 4),
        "held_out_gain": round(judged["held_out"] - judged["default"], 4),
        "chosen_per_fold": [c.label() for c in judged["chosen_per_fold"]],
        "combinations": {c.label(): round(sum(s.values()) / len(s), 4) for c, s in scores.items()},
    }


def settings_lines(report: dict, dataset: str, split: str, recall_k: int) -> str:
    """The settings file for the tuned combination: environment variables, one a line."""
    from twostage.config import env_var

    lines = [(f"# twostage eval --tune {','.join(report['names'])}: {dataset} ({split} split, {report['queries']} "
              f"queries, recall_k {recall_k})."),
             (f"# Final nDCG@10: defaults {report['default_ndcg@10']:.4f}; tuned {report['in_sample_ndcg@10']:.4f} "
              f"in sample, {report['held_out_ndcg@10']:.4f} held out ({report['folds']}-fold cross-validation over "
              "queries).")]
    for name, value in report["best"].items():
        settings_cls, field = setting_of(name)
        lines.append(f"{env_var(settings_cls, field)}={value:g}")
    return "\n".join(lines) + "\n"


def write_if_better(report: dict, path: Path, dataset: str, split: str, recall_k: int) -> str:
    """Write the settings file when the tuned combination beats the defaults held out; say what was done."""
    if not report["best"]:
        return "not written: the defaults did best on these queries; keep them"
    if report["held_out_gain"] <= 0:
        return (f"not written: the tuned settings do not beat the defaults held out (held-out gain "
                f"{report['held_out_gain']:+.4f}, in sample {report['in_sample_gain']:+.4f}); keep the defaults")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(settings_lines(report, dataset, split, recall_k))
    return f"written to {path} (serve it with --settings-file {path})"
