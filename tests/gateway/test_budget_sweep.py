"""Budgets that never waste time: on an idle stack, just started and warmed, each budget from 25 to 500 ms
buys what it affords, on long documents (SciFact abstracts, cut at the model's max_length) and on short ones
(a product catalogue, where a pair costs a fraction of a full-length one). What fits is judged by the
replica's real speed, timed here on direct Rerank calls with the query's own top candidates (the median of
several), and recall's measured time: never by the cost model under test."""

import math
import shutil

import pytest

from gateway.config import GatewaySettings
from twostage.bench.budget_sweep import BUDGETS_MS, QUERY, Row, Stack

pytestmark = pytest.mark.slow

CATALOGUE_QUERY = "keep me warm in winter"
# A search that misses a check is searched again at once, up to this many times in all. The replica scores a
# short-document request in one batch, all or nothing by its deadline, and on a shared 2-core host a burst of
# other work can slow one batch two- or threefold: one search can then lose all its pairs, and the real speed
# timed beside it says nothing of that burst. A cost model that is wrong misses every time (too dear: nothing
# is sent, and nothing corrects it; too cheap: every batch is late); noise rarely misses three times running.
ATTEMPTS = 3


def problems(row: Row, previous: Row | None, pair_ms: float, slowest_recall_ms: float) -> list[str]:
    s = GatewaySettings()
    found = []
    # Recall gets the whole budget when rerank cannot run, else its share; it fits with room for jitter.
    given_ms = row.budget_ms if row.budget_ms < 2 * (s.min_rerank_ms + s.return_margin_ms) \
        else row.budget_ms * s.recall_budget_share
    refused = row.degradation == "DEADLINE_EXCEEDED"
    if refused and given_ms > 2 * slowest_recall_ms:
        found.append("refused, though recall fits")
    # Pairs the budget affords at the replica's real speed, after recall's time and the return margin.
    left_ms = row.budget_ms - (slowest_recall_ms if refused else row.recall_ms) - s.return_margin_ms
    affords = math.floor(left_ms / pair_ms) if left_ms >= s.min_rerank_ms else 0
    # Half of it: room for the headroom the gateway keeps, its per-request overhead, and a noisy host.
    if affords >= 2 and row.reranked < affords // 2:
        found.append(f"affords {affords} pairs at {pair_ms:.1f} ms, reranked {row.reranked}")
    # Pairs do not fall as the budget grows, within the same noise: a smaller budget searched in a quiet moment
    # can buy more than a larger one in a busy moment (seen: 300 ms bought 13 pairs, then 400 ms 10 three times
    # over, at a real speed of 34 ms a pair that affords 400 ms 10). Half of it still catches a budget that
    # skips what a smaller one reranked.
    if previous is not None and row.reranked < previous.reranked // 2:
        found.append(f"fewer than half the pairs {previous.budget_ms} ms bought")
    return found


async def checked_sweep(stack: Stack, phase: str) -> tuple[list[Row], list[str]]:
    """Sweep the budgets, each judged by the replica's real speed timed just before; a row that misses a
    check is searched again at once (ATTEMPTS) and its best answer kept. Returns (rows, what was missed)."""
    pair_ms = await stack.pair_ms(pairs=3, repeats=3)
    rows, missed = [], []
    for budget in BUDGETS_MS:
        row = await stack.search(budget)
        for _ in range(ATTEMPTS - 1):
            slowest = max([r.recall_ms for r in [*rows, row]])
            if not problems(row, rows[-1] if rows else None, pair_ms, slowest):
                break
            await stack.drain()  # a late search's pairs may still hold the model: none of this budget's doing
            again = await stack.search(budget)
            row = max(row, again, key=lambda r: (r.degradation != "DEADLINE_EXCEEDED", r.reranked))
        rows.append(row)
    slowest = max([r.recall_ms for r in rows] + [(await stack.search(max(BUDGETS_MS), skip_rerank=True)).recall_ms])
    for i, row in enumerate(rows):
        missed += [f"{phase} {row.budget_ms} ms: {p}" for p in problems(row, rows[i - 1] if i else None, pair_ms,
                                                                          slowest)]
    table = "\n".join(f"{phase} {r.budget_ms} ms: {r.reranked} reranked, {r.degradation or '-'} (recall "
                      f"{r.recall_ms:.0f} ms, total {r.total_ms:.0f} ms)" for r in rows)
    return rows, [f"{m}\n{table}\n(real speed {pair_ms:.1f} ms a pair)" for m in missed]


@pytest.fixture
def catalogue_copy(tmp_path, catalogue_index):
    target = tmp_path / "catalogue"
    shutil.copytree(catalogue_index, target)
    return target


@pytest.mark.parametrize("corpus", ["scifact", "catalogue"])
async def test_a_budget_buys_what_it_affords_cold_and_warm(corpus, request):
    index_dir, query = {"scifact": ("index_copy", QUERY), "catalogue": ("catalogue_copy", CATALOGUE_QUERY)}[corpus]
    stack = await Stack(request.getfixturevalue(index_dir), query=query).start()
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
