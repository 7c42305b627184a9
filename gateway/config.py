"""Gateway settings: env prefix TWOSTAGE_GATEWAY_, or CLI flags."""

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from twostage.config import ServiceSettings
from twostage.membership import split_targets
from twostage.scoring import (
    DEFAULT_CALIBRATION,
    LEXICAL_CENTER,
    LEXICAL_SCALE,
    RECALL_CENTER,
    RECALL_SCALE,
    Calibration,
    Fusion,
)


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TWOSTAGE_GATEWAY_", frozen=True, extra="forbid")

    port: int = Field(50051, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    http_port: int | None = Field(
        None, ge=0, le=65535,
        description="Also serve HTTP/JSON on this port, in the same process: twostage's own routes (/v1/search, "
        "/v1/documents) and TEI's, Cohere's and OpenAI's (/rerank, /embed, /v1/rerank, /v2/rerank, /v1/embeddings), "
        "with the same tokens, TLS and limits as gRPC. Unset: off (a listener nobody asked for is not opened); "
        "0 picks a free one.",
    )
    recall_targets: str = Field(
        "127.0.0.1:50052",
        description="Comma-separated recall shards in shard order; each is host:port, a|b (replicas of the shard), "
        "dns:///name:port (every address of the name is a replica) or file:///path (one host:port a line).",
    )
    rerank_targets: str = Field(
        "127.0.0.1:50053",
        description="Comma-separated rerank replicas: host:port, dns:///name:port (every address of the name) or "
        "file:///path; one query's pairs are split over the healthy ones.",
    )
    resolve_period_s: float = Field(
        5.0, gt=0,
        description="How often dns:/// and file:/// targets are re-resolved (and at once, at most every 0.5 s, "
        "when a member is unreachable): replicas join and leave while serving.",
    )
    stage_token_file: Path | None = Field(
        None,
        description="File holding the bearer token this gateway sends to recall and rerank (its own credential, "
        "never the caller's); it needs the admin role to route writes.",
    )
    stage_tls_server_name: str = Field(
        "",
        description="With TLS, the name the stages' certificates must carry, when the gateway dials pod "
        "addresses rather than that name (for example recall.twostage.svc). Empty: the target's host.",
    )
    default_top_k: int = Field(10, ge=1, description="Hits returned when a request leaves top_k at 0.")
    default_recall_k: int = Field(100, ge=1, description="Candidates recalled when a request leaves recall_k at 0.")
    max_top_k: int = Field(1000, ge=1, description="Largest top_k accepted (up to recall_k; eval asks for all).")
    max_recall_k: int = Field(1000, ge=1, description="Largest recall_k accepted.")
    default_budget_ms: int = Field(
        10_000, ge=1,
        description="Budget when a request sets none. On 2 CPU cores the default reranker scores about "
        "13 pairs/s, so reranking 100 candidates takes about 8 s; on a GPU 200 ms is ample.",
    )
    max_budget_ms: int = Field(60_000, ge=1, description="Budgets above this are lowered to it.")
    compat_budget_ms: int = Field(
        60_000, ge=1,
        description="Budget of the HTTP face's TEI, Cohere and OpenAI routes, whose clients send none (the "
        "X-Twostage-Budget-Ms header overrides it; max_budget_ms bounds both). Their rerank answers hold every "
        "text or are an error: texts the rerank tier cannot score within the budget are refused before any work, "
        "413 when the request alone is too large (the message says how many fit), 429 with Retry-After when it is "
        "the load. /info's max_client_batch_size is what it affords on an idle tier.",
    )
    recall_budget_share: float = Field(
        0.5, gt=0, le=1,
        description="Most of the budget recall may use; the rest is kept for rerank. Recall usually needs "
        "10-50 ms, so this only bites when a shard is slow.",
    )
    return_margin_ms: float = Field(
        20.0, ge=0, description="Time kept back from rerank for building and sending the response."
    )
    min_rerank_ms: float = Field(
        20.0, ge=0, description="If less than this is left after recall, rerank is skipped (degraded: rerank_skipped)."
    )
    max_query_chars: int = Field(2048, ge=1, description="Longest query accepted.")
    max_embed_texts: int = Field(
        2048, ge=1,
        description="Most texts in one Embed request; the gateway cuts it into pieces of the size a recall replica "
        "accepts and spreads them over the tier.",
    )
    fusion: Fusion = Field(
        Fusion.CALIBRATED,
        description="Final score: calibrated (both scores on the logit scale with constants fitted from the index, "
        "in [0, 1], "
        "comparable across queries), linear (per-query z-scores), rrf or none (rerank only). On SciFact "
        "(recall_k 20) calibrated 0.5 measured nDCG@10 0.7207 against linear 0.7 0.7143, rerank alone 0.6977.",
    )
    fusion_alpha: float = Field(
        0.5, ge=0, le=1,
        description="Weight of rerank in the fusion (0-1). 0.5 suits calibrated; linear measured best at 0.7.",
    )
    calibrated_recall_scale: float | None = Field(
        None, gt=0,
        description="Calibrated fusion: logits per unit of recall cosine. Unset: fitted by the recall servers from "
        f"their own index (each reports it in Info), {RECALL_SCALE:g} until they have.",
    )
    calibrated_recall_center: float | None = Field(
        None, ge=-1, le=1,
        description="Calibrated fusion: the recall cosine that counts as neutral. Unset: fitted from the index (the "
        f"99th percentile of unrelated documents' cosines), {RECALL_CENTER:g} until then.",
    )
    calibrated_lexical_scale: float | None = Field(
        None, ge=0,
        description="Calibrated fusion: logits per BM25 point, when recall ran lexically (hybrid or lexical mode). "
        f"Unset: fitted from the index, {LEXICAL_SCALE:g} until then.",
    )
    calibrated_lexical_center: float | None = Field(
        None, description="Calibrated fusion: the BM25 that counts as neutral. Unset: fitted from the index (the "
        f"99th percentile of unrelated documents' BM25), {LEXICAL_CENTER:g} until then.",
    )
    initial_rerank_ms_per_pair: float = Field(
        70.0, gt=0,
        description="Cost assumed per pair for a replica that has neither published the cost model it fitted at "
        "load (Info) nor answered. 70 suits the default model on 2 CPU cores; about 1 on a GPU.",
    )
    rerank_cost_refresh_s: float = Field(
        30.0, gt=0,
        description="How often each rerank replica's published cost model (Info: cost per pair by length, its "
        "live correction, characters per token) is read again; also within about a second of an answer whose "
        "model time is 3x off the prediction or that came back late. Read at start and on membership changes too.",
    )
    rerank_cost_headroom: float = Field(
        1.1, ge=1, description="Predicted rerank time is multiplied by this when choosing how many pairs fit "
        "(room for the model's speed to vary; a tail that runs late loses only its slice, see rerank_slice_ms)."
    )
    rerank_top_up: bool = Field(
        True,
        description="When a request's rerank calls finish with time left, score the next candidates the cost "
        "model still affords (in the time left, behind the queue then), instead of stopping at the depth chosen "
        "on arrival: under bursty load this keeps the tier busy in the gaps and gives answers more reranked "
        "candidates within the same budget.",
    )
    rerank_round_pairs: int = Field(
        0, ge=0,
        description="Rerank in rounds: the first top_k candidates, then this many more at a time while the last "
        "round still placed one in the top_k. On SciFact (recall_k 20, top_k 10) rounds of 1 scored 39% fewer "
        "pairs at the same nDCG@10; each round is a sequential call, so on a GPU, where pairs are cheap and "
        "calls are not, keep 0: the whole affordable prefix at once.",
    )
    rerank_round_top_k: int = Field(
        10, ge=1, description="With rerank_round_pairs: the hits the rounds watch (at most the request's top_k).",
    )
    rerank_affinity: bool = Field(
        False,
        description="Send each document to a rerank replica chosen by a rendezvous hash of its text (weighted by "
        "speed and backlog) instead of contiguous slices. Measured on a Zipf stream through two replicas, "
        "contiguous slices already kept the one-replica cache hit rate (a repeated query brings the same list "
        "and the same split) and affinity did not beat them (30-33% against 32-34%); it can help where split "
        "sizes vary, under uneven load.",
    )
    rerank_slice_ms: float = Field(
        150.0, ge=0,
        description="When a replica's share of one query is predicted to take over a quarter of the time left, it is sent "
        "as requests of about this much predicted model time each (at least one pair), so a tail that runs late "
        "costs only its own pairs; with time to spare, as one request. 0: always one request.",
    )
    write_timeout_s: float = Field(
        300.0, gt=0,
        description="Longest an Upsert, Delete or Get may take at the shards (a caller's shorter deadline wins). "
        "Embedding 1,000 long documents takes about 2 minutes on 2 CPU cores.",
    )
    write_quorum: Literal["majority", "all", "one"] = Field(
        "majority",
        description="Replicas of each shard that must make a write durable before it is acknowledged: majority "
        "(keeps taking writes with a minority of a shard's replicas down), all (one replica away blocks its "
        "shard's writes) or one (a write acknowledged by one replica is lost if that replica's disk is).",
    )
    shard_replicas: int = Field(
        0, ge=0, le=64,
        description="Replicas each recall shard is meant to have; a write quorum is counted against this (or the "
        "replicas resolved, if more), never against only those that resolve now: with dns:/// a replica that is "
        "down drops out of the answer. 0: as resolved.",
    )
    request_id_ttl_s: float = Field(
        3600.0, gt=0,
        description="How long a write's request_id is remembered, so a resend is applied at the same version and "
        "answered alike (the recall replicas keep theirs for their tombstone_ttl_s).",
    )
    eject_after_failures: int = Field(3, ge=1, description="Consecutive failures that take a rerank replica out.")
    eject_s: float = Field(5.0, ge=0, description="How long an ejected replica stays out unless its health recovers.")
    health_check_period_s: float = Field(1.0, gt=0, description="How often rerank replicas' health is checked.")
    startup_wait_s: float = Field(
        60.0, ge=0,
        description="At start, how long to wait for a rerank replica to be SERVING before serving anyway "
        "(answers are then rerank_unavailable until one is).",
    )

    def calibration(self, fitted: Calibration | None = None) -> Calibration:
        """The constants the calibrated fusion uses: each setting given, else the recall servers' fit (``fitted``),
        else the defaults."""
        base = fitted or DEFAULT_CALIBRATION
        given = (self.calibrated_recall_scale, self.calibrated_recall_center, self.calibrated_lexical_scale,
                 self.calibrated_lexical_center)
        return Calibration(*(ours if ours is not None else theirs for ours, theirs in zip(
            given, (base.scale, base.center, base.lexical_scale, base.lexical_center))))

    @property
    def recall_target_list(self) -> list[str]:
        return split_targets(self.recall_targets)

    @property
    def rerank_target_list(self) -> list[str]:
        return split_targets(self.rerank_targets)
