"""Recall server settings: env prefix TWOSTAGE_RECALL_, or CLI flags."""

from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from twostage import feedback
from twostage.config import BatchingSettings, RuntimeSettings, ServiceSettings
from twostage.documents import DEFAULT_LIMITS, DocumentLimits
from twostage.model_store import DEFAULT_EMBED_MODEL
from twostage.recall_mode import RecallMode
from twostage.scoring import HYBRID_DENSE_WEIGHT, HybridFusion

DEFAULT_INDEX_DIR = Path(platformdirs.user_data_dir("twostage")) / "indexes" / "demo"


class RecallSettings(ServiceSettings, RuntimeSettings, BatchingSettings):
    model_config = SettingsConfigDict(env_prefix="TWOSTAGE_RECALL_", frozen=True, extra="forbid")

    port: int = Field(50052, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    tls_client_auth: bool = Field(
        True, description="With TLS, accept only clients whose certificate chains to ca.pem: the gateway, the "
        "index-build job. Stages are never called by frontends directly.",
    )
    model: str = Field(DEFAULT_EMBED_MODEL, description="Default model name or a model directory.")
    index_dir: Path = Field(DEFAULT_INDEX_DIR, description="Index built by 'twostage index build'.")
    max_length: int = Field(512, ge=8, le=8192, description="Tokens read per text; longer texts are truncated.")
    max_query_chars: int = Field(2048, ge=1, description="Longest query accepted.")
    max_k: int = Field(1000, ge=1, le=100_000, description="Most candidates one search may ask for.")
    max_embed_texts: int = Field(256, ge=1, description="Most texts in one Embed request.")
    max_upsert_docs: int = Field(DEFAULT_LIMITS.max_docs, ge=1, description="Most documents in one Upsert or Delete request.")
    max_doc_chars: int = Field(DEFAULT_LIMITS.max_doc_chars, ge=1, description="Longest document title + text accepted.")
    max_id_chars: int = Field(DEFAULT_LIMITS.max_id_chars, ge=1, le=4096, description="Longest document id accepted.")
    recall_mode: RecallMode = Field(
        RecallMode.HYBRID,
        description="How a search without a mode finds candidates: dense (embedding nearest neighbours), lexical "
        "(BM25 over title and text) or hybrid (both, fused). On SciFact hybrid measured best (see the README).",
    )
    hybrid_fusion: HybridFusion = Field(
        HybridFusion.ZSCORE,
        description="How hybrid mode fuses the dense and lexical lists: per-query z-scores or reciprocal rank fusion.",
    )
    lexical_depth: int = Field(
        1000, ge=1, le=100_000,
        description="Hybrid mode reads this many BM25 matches (at least k) to score the dense candidates lexically; "
        "a candidate beyond them gets the last score read, an upper bound.",
    )
    hybrid_dense_weight: float = Field(
        HYBRID_DENSE_WEIGHT, ge=0, le=1,
        description="Weight of the dense list in hybrid fusion (0-1). On SciFact z-score fusion measured best at "
        "0.6-0.7 (recall nDCG@10 0.738-0.739, Recall@20 0.917-0.920); RRF at best 0.727 / 0.907.",
    )
    prf_depth: int = Field(
        feedback.DEFAULT.depth, ge=0, le=feedback.MAX_DEPTH,
        description="Pseudo-relevance feedback for hybrid searches: after the first pass the query's vector moves "
        "toward the stored vectors of its top prf_depth hits and the search runs again (BM25 is read once); 0: off. "
        "Dense searches get it when the request asks (prf_depth or prf_weight). A gateway over several shards forms "
        "it from the global first pass and sends it to every shard. On SciFact (recall_k 20) 5 hits at weight 0.5 "
        "lifted hybrid recall's nDCG@10 from 0.7343 to 0.7466 and Recall@20 from 0.9097 to 0.9317.",
    )
    prf_weight: float = Field(
        feedback.DEFAULT.weight, ge=0, le=1,
        description="Pseudo-relevance feedback: the share of the top hits' centroid in the refined query vector "
        "(0-1; 0: off).",
    )
    calibration_refit_min_interval_s: float = Field(
        60.0, ge=0,
        description="Least time between two fits of the score calibration: a fit embeds up to 256 pseudo-queries, "
        "so on a small corpus under steady writes it would otherwise run every few dozen writes.",
    )
    calibration_refit_writes: int = Field(
        1000, ge=0,
        description="The score calibration (cosine and BM25 onto the cross-encoder's logit scale, fitted from this "
        "index's own documents at open) is fitted again after this many writes, or after writes of a tenth of "
        "the documents when that is fewer; 0: only at open.",
    )
    filter_exact_max_docs: int = Field(
        10_000, ge=0,
        description="A filtered search scores every passing document exactly when at most this many pass; when "
        "more pass it searches the graph with over-fetch. Either way the result is exact.",
    )
    filter_max_fetch: int = Field(
        4096, ge=1,
        description="The most neighbours a filtered search fetches from the graph (the over-fetch grows fourfold "
        "up to it); when they hold fewer than k passing documents, every passing document is scored exactly, in "
        "chunks that let writes and the deadline in between.",
    )
    metadata_coerce: bool = Field(
        False,
        description="Convert a written metadata value to its key's type in the index's schema where that loses "
        "nothing (\"12.99\" to a number, \"true\" to a boolean, 7 to \"7\", a string to a list of one); "
        "otherwise a value of the wrong type is refused (INVALID_ARGUMENT naming the document and the key).",
    )
    snapshot_dir: Path | None = Field(
        None,
        description="Where index-build jobs publish snapshots (SNAPSHOT_DIR/shard-I/VERSION, a shared volume). When "
        "set, the server serves its shard's newest complete snapshot, copied to its own volume (index_dir is then "
        "a link it manages), waits NOT_SERVING until one exists, and switches to newer ones while serving.",
    )
    shard: int = Field(0, ge=0, le=4095, description="Which shard's snapshots to serve (with snapshot_dir).")
    snapshot_poll_s: float = Field(
        30.0, ge=0.05, le=3600, description="How often to look for a newer snapshot (with snapshot_dir).",
    )
    peers: str = Field(
        "",
        description="This shard's replicas, this server included: dns:///name:port (the shard's headless Service), "
        "a|b, or file:///path. With snapshot_dir, the server copies from them the writes it missed while it was away "
        "(at start, before it serves, then every peer_sync_period_s) and compares digests with them.",
    )
    peer_sync_period_s: float = Field(
        10.0, ge=0.05, le=3600,
        description="How often to copy the writes the other replicas hold since the snapshot (with peers).",
    )
    anti_entropy_period_s: float = Field(
        30.0, ge=0.05, le=86400,
        description="How often to compare per-bucket digests of (id, version) with each other replica and pull the "
        "documents it holds newer (with peers): repairs what catch-up cannot see, such as a restored disk.",
    )
    tombstone_ttl_s: float = Field(
        7 * 86400.0, ge=1,
        description="How long a delete's tombstone (and a write's request id) is kept. A replica away longer than "
        "this must start again from a snapshot on an empty volume, or deleted documents could come back.",
    )
    peer_token_file: Path | None = Field(
        None, description="A file holding an admin token for calling the other replicas (when they check tokens).",
    )
    peer_tls_server_name: str = Field(
        "", description="The name the other replicas' certificates carry, when it is not their address's host.",
    )
    read_only: bool = Field(
        False,
        description="Open the index read-only (a shared lock): replicas serving one snapshot; writes are refused.",
    )
    save_every_writes: int = Field(
        1000, ge=1, description="Save the HNSW graph after this many writes; the store replays the rest on start."
    )
    # Measured with `twostage bench embed` on 2 CPU cores, documents/s by batch size (512 tokens):
    # 8: 7.6, 16: 7.5, 32: 6.9, 64: 6.5. 4096 tokens holds 8 long documents or 64 queries.
    # One long document (512 tokens) per bulk batch: a query waits for at most one document's embedding.
    bulk_max_batch_tokens: int = Field(
        512, ge=1, description="Most padded tokens in one batch of documents being written; queries go first."
    )
    max_batch_tokens: int = Field(4096, ge=1, description="Most padded tokens in one embedding call.")

    def document_limits(self) -> DocumentLimits:
        return DocumentLimits(self.max_upsert_docs, self.max_doc_chars, self.max_id_chars)
