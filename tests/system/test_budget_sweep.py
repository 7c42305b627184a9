"""Budgets that never waste time: on an idle stack, just started and warmed, each budget from 25 to 500 ms
buys what it affords, on long documents (SciFact abstracts, cut at the model's max_length) and on short ones
(a product catalogue, where a pair costs a fraction of a full-length one). What fits is judged by the
replica's real speed, timed here on direct Rerank calls with the query's own top candidates (the median of
several), and recall's measured time: never by the cost model under test."""

import asyncio
import math
import shutil

import pytest

from gateway.config import GatewaySettings
from twostage.batching import STALE_S
from twostage.bench.budget_sweep import BUDGETS_MS, QUERY, Row, Stack

pytestmark = pytest.mark.slow

CATALOGUE_QUERY = "keep me warm in winter"
# Each budget in which two pairs or more fit at the replica's real speed reranks one at least, and over the
# sweep's budgets at least half the pairs that fit are reranked. Half of each budget's would be flaky: on a
# shared 2-core host a burst of other work slows the model two- to fourfold for a moment (seen: 7 short pairs
# in 331 ms, at a measured 13 ms a pair), and a replica scores one call's short pairs in one batch, all or
# nothing by the deadline, so one search can lose most of its pairs. A budget short of half is searched
# again, up to ATTEMPTS times in all, judged by the slower of the real speeds timed for the sweep and just
# before (recall refusing a query on an estimate one slow batch inflated corrects it once its lane has been
# idle STALE_S). A cost model that is wrong misses every time (too dear: nothing is sent, and nothing
# corrects it; too cheap: every batch is late).
ATTEMPTS = 3


def affords(row: Row, pair_ms: float, slowest_recall_ms: float, candidates: int) -> int:
    """Pairs the budget affords at the replica's real speed, after recall's time and the return margin."""
    s = GatewaySettings()
    refused = row.degradation == "DEADLINE_EXCEEDED"
    left_ms = row.budget_ms - (slowest_recall_ms if refused else row.recall_ms) - s.return_margin_ms
    return min(math.floor(left_ms / pair_ms), candidates) if left_ms >= s.min_rerank_ms else 0


def problems(row: Row, previous: Row | None, pair_ms: float, slowest_recall_ms: float, candidates: int,
             share: float = 0.0) -> list[str]:
    """What is wrong with a row: refused though recall fits; no pair where two fit (or fewer than ``share`` of
    those that fit); fewer than half the pairs a smaller budget bought."""
    s = GatewaySettings()
    found = []
    # Recall gets the whole budget when rerank cannot run, else its share; it fits with room for jitter.
    given_ms = row.budget_ms if row.budget_ms < 2 * (s.min_rerank_ms + s.return_margin_ms) \
        else row.budget_ms * s.recall_budget_share
    refused = row.degradation == "DEADLINE_EXCEEDED"
    if refused and given_ms > 2 * slowest_recall_ms:
        found.append("refused, though recall fits")
    fit = affords(row, pair_ms, slowest_recall_ms, candidates)
    if fit >= 2 and row.reranked < max(1, math.floor(share * fit)):
        found.append(f"affords {fit} pairs at {pair_ms:.1f} ms, reranked {row.reranked}")
    # Pairs do not fall as the budget grows, within the same noise: a smaller budget searched in a quiet moment
    # can buy more than a larger one in a busy moment (seen: 300 ms bought 13 pairs, then 400 ms 10 three times
    # over, at a real speed of 34 ms a pair that affords 400 ms 10). Half of it still catches a budget that
    # skips what a smaller one reranked.
    if previous is not None and row.reranked < previous.reranked // 2:
        found.append(f"fewer than half the pairs {previous.budget_ms} ms bought")
    return found


async def checked_sweep(stack: Stack, phase: str) -> tuple[list[Row], list[str]]:
    """Sweep the budgets, each judged by the replica's real speed timed just before; a row that misses a
    check is searched again (ATTEMPTS) and its best answer kept. Returns (rows, what was missed)."""
    sweep_ms = await stack.pair_ms(pairs=3, repeats=3)
    recall_ms = (await stack.search(max(BUDGETS_MS), skip_rerank=True)).recall_ms
    rows, speeds = [], []
    for budget in BUDGETS_MS:
        row, pair_ms = await stack.search(budget), sweep_ms
        for _ in range(ATTEMPTS - 1):
            slowest = max([recall_ms] + [r.recall_ms for r in [*rows, row]])
            if not problems(row, rows[-1] if rows else None, pair_ms, slowest, stack.recall_k, share=0.5):
                break
            await stack.drain()  # a late search's pairs may still hold the model: none of this budget's doing
            if row.degradation == "DEADLINE_EXCEEDED":
                await asyncio.sleep(STALE_S + 0.1)  # a batcher refusing on a stale estimate corrects it by then
            pair_ms = max(pair_ms, await stack.pair_ms(pairs=3, repeats=1))
            again = await stack.search(budget)
            row = max(row, again, key=lambda r: (r.degradation != "DEADLINE_EXCEEDED", r.reranked))
        rows.append(row)
        speeds.append(pair_ms)
    slowest = max([recall_ms] + [r.recall_ms for r in rows]
                  + [(await stack.search(max(BUDGETS_MS), skip_rerank=True)).recall_ms])
    missed = []
    for i, (row, pair_ms) in enumerate(zip(rows, speeds)):
        missed += [f"{phase} {row.budget_ms} ms: {p} (real speed {pair_ms:.1f} ms a pair)"
                   for p in problems(row, rows[i - 1] if i else None, pair_ms, slowest, stack.recall_k)]
    # Over the budgets in which two pairs or more fit, at least half the pairs that fit are reranked. Each alone
    # need rerank one: a burst can cost one budget most of its pairs, never a whole sweep.
    fits = [(affords(r, ms, slowest, stack.recall_k), r.reranked) for r, ms in zip(rows, speeds)]
    fit, reranked = sum(f for f, _ in fits if f >= 2), sum(n for f, n in fits if f >= 2)
    if reranked < fit // 2:
        missed.append(f"{phase}: {reranked} pairs reranked where {fit} fit")
    table = "\n".join(f"{phase} {r.budget_ms} ms: {r.reranked} reranked, {r.degradation or '-'} (recall "
                      f"{r.recall_ms:.0f} ms, total {r.total_ms:.0f} ms)" for r in rows)
    return rows, [f"{m}\n{table}\n(real speed {sweep_ms:.1f} ms a pair for the sweep)" for m in missed]


@pytest.fixture(params=["scifact", "catalogue"])
def corpus(request, tmp_path) -> tuple:
    """(a copy of the index, the query searched): SciFact's abstracts, or the catalogue's short texts."""
    if request.param == "scifact":
        return request.getfixturevalue("index_copy"), QUERY
    target = tmp_path / "catalogue"
    shutil.copytree(request.getfixturevalue("catalogue_index"), target)
    return target, CATALOGUE_QUERY


async def test_a_budget_buys_what_it_affords_cold_and_warm(corpus):
    stack = await Stack(corpus[0], query=corpus[1]).start()
    try:
        assert stack.published.pair_ms_per_token > 0 and stack.published.ms_per_pair > 0
        cold, missed_cold = await checked_sweep(stack, "cold")
        for _ in range(2):  # warmed: the model has run on these pairs' shapes, the cost model has learned
            await stack.search(max(BUDGETS_MS))
        warm, missed_warm = await checked_sweep(stack, "warm")
    finally:
        await stack.close()
    assert [r.budget_ms for r in cold] == [r.budget_ms for r in warm] == list(BUDGETS_MS)
    if missed_cold or missed_warm:
        pytest.fail("\n\n".join(missed_cold[:1] + missed_warm[:1]), pytrace=False)
