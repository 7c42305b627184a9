"""Prometheus metrics shared by the services."""

import prometheus_client as prom

BATCH_SIZE = prom.Histogram(
    "twostage_batch_size_items", "Items per model batch", ["batcher"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
BATCH_PADDED_TOKENS = prom.Counter("twostage_batch_padded_tokens_total", "Padded tokens computed", ["batcher"])
BATCH_REAL_TOKENS = prom.Counter("twostage_batch_real_tokens_total", "Real (unpadded) tokens computed", ["batcher"])
QUEUE_WAIT = prom.Histogram(
    "twostage_batch_queue_wait_seconds", "Time an item waited before its batch ran", ["batcher"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
COMPUTE_TIME = prom.Histogram(
    "twostage_batch_compute_seconds", "Model time per batch", ["batcher"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def batch_observer(batcher: str):
    """A DynamicBatcher observer that records each batch under ``batcher``."""

    def observe(size: int, real_tokens: int, padded_tokens: int, waits_s: list[float], compute_s: float) -> None:
        BATCH_SIZE.labels(batcher).observe(size)
        BATCH_REAL_TOKENS.labels(batcher).inc(real_tokens)
        BATCH_PADDED_TOKENS.labels(batcher).inc(padded_tokens)
        for wait in waits_s:
            QUEUE_WAIT.labels(batcher).observe(wait)
        COMPUTE_TIME.labels(batcher).observe(compute_s)

    return observe


def start_metrics_server(port: int, host: str) -> None:
    prom.start_http_server(port, addr=host)


class BatcherStatsCollector:
    """Exports each registered batcher's running totals at scrape time."""

    def __init__(self):
        self._batchers = {}

    def register(self, batcher) -> None:
        self._batchers[batcher.name] = batcher

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counters = {
            "shed_items": "Items refused because the queue was full",
            "expired_items": "Items dropped because their deadline passed while queued",
            "failed_batches": "Batches whose model call raised",
            "batches": "Batches computed",
            "items": "Items computed",
        }
        for field, help_text in counters.items():
            family = CounterMetricFamily(f"twostage_batcher_{field}", help_text, labels=["batcher"])
            for name, batcher in self._batchers.items():
                family.add_metric([name], getattr(batcher.stats, field))
            yield family
        waste = GaugeMetricFamily(
            "twostage_batcher_padding_waste_ratio", "Share of computed tokens that were padding", labels=["batcher"]
        )
        queued = GaugeMetricFamily("twostage_batcher_queued_items", "Items waiting for a batch", labels=["batcher"])
        for name, batcher in self._batchers.items():
            waste.add_metric([name], batcher.stats.padding_waste)
            queued.add_metric([name], batcher.queued_items)
        yield waste
        yield queued


BATCHERS = BatcherStatsCollector()
prom.REGISTRY.register(BATCHERS)


def watch_batcher(batcher) -> None:
    """Publish a batcher's histograms (per batch) and totals (at scrape)."""
    batcher.add_observer(batch_observer(batcher.name))
    BATCHERS.register(batcher)
