"""Budgets that never waste time: on an idle stack, just started and warmed, each budget from 25 to 500 ms
buys what it affords. What fits is read from the stack itself (the replica's published cost per pair,
recall's measured time), never from an assumed CPU speed."""

import pytest

from gateway.config import GatewaySettings
from twostage.bench.budget_sweep import BUDGETS_MS, run

pytestmark = pytest.mark.slow


async def test_a_budget_buys_what_it_affords_cold_and_warm(index_copy):
    sweep = await run(index_copy, warm_searches=2)
    s = GatewaySettings()
    assert sweep.ms_per_pair > 0
    for name, rows in (("cold", sweep.cold), ("warm", sweep.warm)):
        assert [r.budget_ms for r in rows] == list(BUDGETS_MS)
        table = "\n".join(f"{name} {r}" for r in rows)
        for row in rows:
            # Recall gets the whole budget when rerank cannot run, else its share; it fits with room for jitter.
            given_ms = row.budget_ms if row.budget_ms < 2 * (s.min_rerank_ms + s.return_margin_ms) \
                else row.budget_ms * s.recall_budget_share
            if given_ms > 2 * sweep.recall_ms:
                assert row.degradation != "DEADLINE_EXCEEDED", table
            # By the replica's own measured speed: published at load, or slower as its answers reported it since.
            ms_per_pair = max([sweep.ms_per_pair] + [r.ms_per_pair for r in rows[:rows.index(row)]])
            pairs_fit = (row.budget_ms - row.recall_ms - s.return_margin_ms) / ms_per_pair
            if pairs_fit >= 2:
                assert row.reranked >= 1, table
        reranked = [r.reranked for r in rows]
        assert reranked == sorted(reranked), table
