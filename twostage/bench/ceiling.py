"""Raw onnxruntime rates, items length-sorted globally: the stock graph's best over batch sizes (the ceiling
the servers are held to), and each execution plan fed as the batcher would feed it."""

import time
from collections.abc import Callable, Sequence

from twostage.batching import BatchPolicy, plan_batches
from twostage.execution_plan import ExecutionPlan, ModelCall


def best_rate(items: Sequence, lengths: list[int], run_batch: Callable[[list], object], batch_sizes: list[int]) -> dict:
    run_batch(list(items[:4]))  # warm-up
    by_size = {}
    for size in batch_sizes:
        start = time.perf_counter()
        for plan in plan_batches(lengths, size, 1 << 30):
            run_batch([items[i] for i in plan])
        by_size[size] = len(items) / (time.perf_counter() - start)
    best = max(by_size, key=by_size.get)
    return {"rate": by_size[best], "best_batch_size": best, "by_batch_size": by_size}


def plan_rates(plans: Sequence[ExecutionPlan], items: Sequence, call: ModelCall, policy: BatchPolicy) -> dict:
    """Items/s of each plan, in the batches ``policy`` (as the plan adjusts it) makes of ``items``."""
    lengths = [item.length for item in items]
    rates = {}
    for plan in plans:
        adjusted = plan.policy(policy)
        batches = plan_batches(lengths, adjusted.max_batch_size, adjusted.max_batch_tokens)
        plan.run([items[i] for i in batches[-1]], call)  # warm-up: the longest batch allocates
        start = time.perf_counter()
        for batch in batches:
            plan.run([items[i] for i in batch], call)
        rates[plan.label] = len(items) / (time.perf_counter() - start)
    return rates
