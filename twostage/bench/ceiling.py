"""The raw onnxruntime ceiling: the best rate over batch sizes, items length-sorted globally."""

import time
from collections.abc import Callable, Sequence

from twostage.batching import plan_batches


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
