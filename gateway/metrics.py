"""The gateway's own metrics: where the budget went and what was cut.

``twostage_gateway_promotion_depth`` is the live recall_k advisor: if final
hits often come from deep in the recall list, relevant documents are likely
being cut off just below recall_k.
"""

import prometheus_client as prom

STAGE_LATENCY = prom.Histogram(
    "twostage_gateway_stage_seconds", "Time per stage as seen by the gateway", ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10),
)
DEGRADED = prom.Counter("twostage_gateway_degraded_total", "Degraded answers by reason", ["reason"])
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
    for stage in ("recall", "rerank", "total"):
        if f"{stage}_ms" in result.timings_ms:
            STAGE_LATENCY.labels(stage).observe(result.timings_ms[f"{stage}_ms"] / 1000)
    observe_degradations(result.degradations)
    RERANK_DEPTH.observe(result.reranked)
    if result.candidates:
        RERANK_SHARE.observe(result.reranked / result.candidates)
    for hit in result.hits:
        PROMOTION_DEPTH.observe(hit.recall_rank)


def observe_degradations(degradations) -> None:
    for degradation in degradations:
        DEGRADED.labels(degradation.code.value).inc()
