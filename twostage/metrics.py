"""Prometheus metrics shared by the services.

The latency histograms carry the trace id of a sampled request as an exemplar
(served in the OpenMetrics format, which Prometheus asks for), so a point on a
latency graph opens its trace.
"""

import asyncio
import contextlib
import logging
import socket
import time
import weakref

import grpc
import prometheus_client as prom

from twostage import tracing
from twostage.tracing import exemplar

NOT_TRACED = contextlib.nullcontext(tracing.INVALID_SPAN)

access_log = logging.getLogger("twostage.access")

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
        traced = exemplar()  # the batch's span, current while observers run
        for wait in waits_s:
            QUEUE_WAIT.labels(batcher).observe(wait, traced)
        COMPUTE_TIME.labels(batcher).observe(compute_s, traced)

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
            "expired_items": "Items dropped uncomputed: their deadline passed, or would even computed alone",
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


class ScoreCacheCollector:
    """Exports the rerank score caches' running totals and size at scrape time (summed over the caches
    alive in this process: one per rerank server)."""

    def __init__(self):
        self._caches = weakref.WeakSet()

    def register(self, cache) -> None:
        self._caches.add(cache)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        caches = list(self._caches)
        counters = {
            "hits": "Pairs answered from the score cache",
            "misses": "Pairs the score cache did not hold",
            "shared": "Pairs awaited from an identical pair in flight",
            "evictions": "Scores evicted to stay within the byte bound",
        }
        for field, help_text in counters.items():
            yield CounterMetricFamily(f"twostage_rerank_cache_{field}", help_text,
                                      value=sum(getattr(c.stats, field) for c in caches))
        yield GaugeMetricFamily("twostage_rerank_cache_bytes", "Bytes the score cache holds (keys, scores, bookkeeping)",
                                value=sum(c.bytes for c in caches))


SCORE_CACHES = ScoreCacheCollector()
prom.REGISTRY.register(SCORE_CACHES)


def watch_score_cache(cache) -> None:
    SCORE_CACHES.register(cache)


class RecallCollector:
    """At scrape time, per recall server in this process: the documents its shard holds, and the space on the
    volume of the index it serves (an index that cannot grow refuses writes)."""

    def __init__(self):
        self._services = weakref.WeakSet()

    def register(self, service) -> None:
        self._services.add(service)

    def collect(self):
        import os

        from prometheus_client.core import GaugeMetricFamily

        documents = GaugeMetricFamily("twostage_recall_documents", "Live documents in this server's shard",
                                      labels=["shard"])
        free = GaugeMetricFamily("twostage_recall_volume_free_bytes",
                                 "Bytes free (to this user) on the volume of the served index", labels=["shard"])
        size = GaugeMetricFamily("twostage_recall_volume_size_bytes", "Size of the volume of the served index",
                                 labels=["shard"])
        # One series per shard even when several servers of a shard share this process (a duplicate series
        # breaks OpenMetrics parsers): the most documents, and the fullest volume.
        counts: dict[str, int] = {}
        volumes: dict[str, tuple[int, int]] = {}
        for service in list(self._services):
            index = service.index
            if index is None:
                continue
            shard = str(index.manifest.shard)
            counts[shard] = max(counts.get(shard, 0), service.doc_count())
            try:
                stat = os.statvfs(index.directory)
            except OSError:  # replaced meanwhile (a snapshot switch): the next scrape reads the new one
                continue
            volume = (stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize)
            volumes[shard] = min(volumes.get(shard, volume), volume)
        for shard, count in sorted(counts.items()):
            documents.add_metric([shard], count)
        for shard, (available, total) in sorted(volumes.items()):
            free.add_metric([shard], available)
            size.add_metric([shard], total)
        yield documents
        yield free
        yield size


RECALL = RecallCollector()
prom.REGISTRY.register(RECALL)


def watch_recall(service) -> None:
    RECALL.register(service)


RECALL_SEARCH_SECONDS = prom.Histogram(
    "twostage_recall_search_seconds", "Recall search time by mode (dense, lexical, hybrid), embedding included",
    ["mode"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
RECALL_SNAPSHOT_CHECK_FAILURES = prom.Counter(
    "twostage_recall_snapshot_check_failures_total",
    "Looks for a newer snapshot that failed (unreadable, damaged or half-synced); each is retried at the next poll",
)
SERVING = prom.Gauge("twostage_serving", "1 while this server reports SERVING (loaded, not draining, model moving)",
                     ["tier"])
# protocol: grpc, or http for the gateway's HTTP/JSON face (its routes counted under the RPC each one calls, with
# the gRPC code its answer's status stands for).
RPC_REQUESTS = prom.Counter("twostage_rpc_requests_total", "RPCs handled", ["method", "code", "protocol"])
RPC_LATENCY = prom.Histogram(
    "twostage_rpc_latency_seconds", "Server-side RPC latency", ["method", "protocol"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def observe_rpc(method: str, code: str, protocol: str, elapsed_s: float, request_id: str = "") -> None:
    """Count, time and log one call, whichever face it came through. The request id is logged only when it is
    printable and at most 128 characters (ids of any caller, checked or not yet, must not forge log lines)."""
    if len(request_id) > 128 or not request_id.isprintable():
        request_id = ""
    RPC_REQUESTS.labels(method, code, protocol).inc()
    RPC_LATENCY.labels(method, protocol).observe(elapsed_s, exemplar())
    access_log.info(
        "%s %s %.1f ms", method, code, 1000 * elapsed_s,
        extra={"request_id": request_id, "method": method, "code": code, "protocol": protocol,
               "latency_ms": round(1000 * elapsed_s, 2)},
    )


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every unary RPC by method and status code, times it, and logs it with its request id; while
    tracing is on, runs it in its server span (``twostage.tracing.server_span``: none when the request's
    ``trace_unsampled`` says its caller declined it, else child of the caller's when the metadata carries a
    traceparent), health checks and reflection aside. One interceptor for both: each
    layer of interceptor costs an RPC a handler and a coroutine more. Outermost, so that the metrics and the
    access log see the span (its exemplar, its trace id)."""

    def __init__(self, traced: bool | None = None):
        self.traced = tracing.enabled if traced is None else traced
        self.replica = socket.gethostname()  # and the port, once bound (``bound``)

    def bound(self, port: int) -> None:
        self.replica = f"{socket.gethostname()}:{port}"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        full = handler_call_details.method  # "/twostage.v1.Rerank/Rerank"
        # "/twostage.v1.Rerank/Rerank" -> "Rerank/Rerank"
        service, name = full.rsplit("/", 2)[-2:]
        method = f"{service.rsplit('.', 1)[-1]}/{name}"
        behavior = handler.unary_unary
        traced = self.traced and not full.startswith("/grpc.")
        declines_in_request = traced and full[1:] in tracing.DECLINED_IN_REQUEST  # its message has trace_unsampled
        metadata = handler_call_details.invocation_metadata

        async def observed(request, context):
            start = time.perf_counter()
            code = "OK"
            declined = declines_in_request and request.trace_unsampled
            with tracing.server_span(full[1:], metadata, declined_by_caller=declined) if traced else NOT_TRACED as span:
                if span.is_recording():
                    tracing.rpc_started(span, full[1:], self.replica)
                try:
                    return await behavior(request, context)
                except asyncio.CancelledError:
                    # gRPC cancels the handler when its caller's deadline passes or the caller goes away.
                    remaining = context.time_remaining()
                    code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                    raise
                except BaseException:
                    code = context.code().name if context.code() is not None else "UNKNOWN"
                    raise
                finally:
                    if span.is_recording():
                        tracing.rpc_ended(span, context.code() or getattr(grpc.StatusCode, code))
                    observe_rpc(method, code, "grpc", time.perf_counter() - start, getattr(request, "request_id", ""))

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
