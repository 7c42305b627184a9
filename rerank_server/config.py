"""Rerank server settings: env prefix TWOSTAGE_RERANK_, or CLI flags."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from twostage.config import BatchingSettings, RuntimeSettings, ServiceSettings
from twostage.model_store import DEFAULT_RERANK_MODEL


class RerankSettings(ServiceSettings, RuntimeSettings, BatchingSettings):
    model_config = SettingsConfigDict(env_prefix="TWOSTAGE_RERANK_", frozen=True, extra="forbid")

    port: int = Field(50053, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    tls_client_auth: bool = Field(
        True, description="With TLS, accept only clients whose certificate chains to ca.pem: the gateway, the "
        "index-build job. Stages are never called by frontends directly.",
    )
    model: str = Field(DEFAULT_RERANK_MODEL, description="Default model name or a model directory.")
    max_length: int = Field(
        256, ge=8, le=8192,
        description="Tokens per (query, document) pair; documents are truncated to fit. Measured on SciFact "
        "(recall_k 20, final nDCG@10 / pairs/s): 128: 0.7381 / 44.9, 192: 0.7462 / 29.0, 256: 0.7480 / 25.7, "
        "384: 0.7486 / 15.9; 256 keeps nearly all the quality at 1.6x the speed of 384.",
    )
    score_cache_mb: float = Field(
        64.0, ge=0,
        description="Bound of the pair-score cache (LRU; about 200 bytes a pair, so 64 MB holds ~300,000 pairs). "
        "0 turns it off. A request can bypass it.",
    )
    max_query_chars: int = Field(2048, ge=1, description="Longest query accepted.")
    max_documents: int = Field(1000, ge=1, description="Most documents in one request.")
    max_document_chars: int = Field(100_000, ge=1, description="Longest document accepted.")
    # Measured with `twostage bench rerank` on 2 CPU cores, pairs/s by batch size (abstracts cut at 256
    # tokens): 4: 13.2, 8: 11.9, 16: 10.7, 32: 11.9. Small batches win on CPU, so the token budget
    # holds ~4 long pairs (or 16 short ones) per call.
    max_batch_size: int = Field(32, ge=1, description="Most pairs in one model call; raise to 64-256 on a GPU.")
    max_batch_tokens: int = Field(
        1024, ge=1, description="Most padded tokens (pairs x longest pair) in one call; 8192-32768 on a GPU."
    )
