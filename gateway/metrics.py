"""The gateway's own metrics: where the budget went and what was cut.

``twostage_gateway_promotion_depth`` is the live recall_k advisor: if final
hits often come from deep in the recall list, relevant documents are likely
being cut off just below recall_k.

Replicas: ``twostage_gateway_replica_unavailable_seconds`` says, per rerank
replica, how long it has been out of the gateway's rotation (ejected after
failures, NOT_SERVING, or silent); ejections and membership changes are
counted.
"""

import time
import weakref

import prometheus_client as prom

from gateway.degradation import DegradationCode
from twostage.tracing import exemplar

STAGE_LATENCY = prom.Histogram(
    "twostage_gateway_stage_seconds", "Time per stage as seen by the gateway", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
)
DEGRADED = prom.Counter("twostage_gateway_degraded_total", "Degraded answers by reason", ["reason"])
for _code in DegradationCode:  # every reason exported from the start: a rate over a series that never appeared is empty
    DEGRADED.labels(_code.value)
TIERS = ("recall", "rerank")
EJECTIONS = prom.Counter("twostage_gateway_replica_ejections_total",
                         "Replicas taken out of rotation after failing eject_after_failures times in a row", ["tier"])
MEMBERSHIP_CHANGES = prom.Counter("twostage_gateway_membership_changes_total",
                                  "Replica addresses that joined or left a tier (re-resolved targets)",
                                  ["tier", "change"])
for _tier in TIERS:
    EJECTIONS.labels(_tier)
    for _change in ("added", "removed"):
        MEMBERSHIP_CHANGES.labels(_tier, _change)
RERANK_DEPTH = prom.Histogram(
    "twostage_gateway_rerank_depth", "Candidates reranked per search", buckets=(0, 1, 5, 10, 20, 50, 100, 200, 500)
)
RERANK_SHARE = prom.Histogram(
    "twostage_gateway_rerank_share", "Reranked share of the candidates", buckets=(0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
)
PROMOTION_DEPTH = prom.Histogram(
    "twostage_gateway_promotion_depth", "Recall position of each returned hit",
    buckets=(1, 5, 10, 20, 50, 100, 200, 500, 1000),
)


def observe_search(result) -> None:
    traced = exemplar()
    for stage in ("recall", "rerank", "total"):
        if f"{stage}_ms" in result.timings_ms:
            STAGE_LATENCY.labels(stage).observe(result.timings_ms[f"{stage}_ms"] / 1000, traced)
    observe_degradations(result.degradations)
    RERANK_DEPTH.observe(result.reranked)
    if result.candidates:
        RERANK_SHARE.observe(result.reranked / result.candidates)
    for hit in result.hits:
        PROMOTION_DEPTH.observe(hit.recall_rank)


def observe_degradations(degradations) -> None:
    for degradation in degradations:
        DEGRADED.labels(degradation.code.value).inc()


def membership_changed(tier: str, added: int, removed: int) -> None:
    if added:
        MEMBERSHIP_CHANGES.labels(tier, "added").inc(added)
    if removed:
        MEMBERSHIP_CHANGES.labels(tier, "removed").inc(removed)


class ReplicaCollector:
    """Per rerank replica of the pools alive in this process, at scrape time: seconds out of rotation."""

    def __init__(self):
        self._pools = weakref.WeakSet()

    def register(self, pool) -> None:
        self._pools.add(pool)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("twostage_gateway_replica_unavailable_seconds",
                                   "Seconds this replica has been out of rotation (ejected, NOT_SERVING or silent); "
                                   "0 while it takes work", labels=["tier", "replica"])
        now = time.monotonic()
        # One series per replica, even when several pools in this process share one (a duplicate series breaks
        # OpenMetrics parsers): the longest time out of rotation.
        out: dict[str, float] = {}
        for pool in list(self._pools):
            for replica in list(pool.replicas):
                since = replica.unavailable_since_s
                out[replica.target] = max(out.get(replica.target, 0.0), 0.0 if since is None else now - since)
        for target, seconds in sorted(out.items()):
            family.add_metric(["rerank", target], seconds)
        yield family


REPLICAS = ReplicaCollector()
prom.REGISTRY.register(REPLICAS)
