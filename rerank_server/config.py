"""Rerank server settings: env prefix TWOSTAGE_RERANK_, or CLI flags."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from twostage.config import BatchingSettings, RuntimeSettings, ServiceSettings
from twostage.model_store import DEFAULT_RERANK_MODEL


class RerankSettings(ServiceSettings, RuntimeSettings, BatchingSettings):
    model_config = SettingsConfigDict(env_prefix="TWOSTAGE_RERANK_", frozen=True, extra="forbid")

    port: int = Field(50053, description="Port to bind; 0 picks a free one.")
    model: str = Field(DEFAULT_RERANK_MODEL, description="Default model name or a model directory.")
    max_length: int = Field(
        256,
        description="Tokens per (query, document) pair; documents are truncated to fit. 256 keeps "
        "nearly all of a typical abstract at half the cost of 512.",
    )
    max_query_chars: int = Field(2048, description="Longest query accepted.")
    max_documents: int = Field(1000, description="Most documents in one request.")
    max_document_chars: int = Field(100_000, description="Longest document accepted.")
    # On 2 CPU cores small length-sorted batches are as fast as large ones.
    max_batch_size: int = Field(16, description="Most pairs in one model call; raise to 64-256 on a GPU.")
    max_batch_tokens: int = Field(4096, description="Most padded tokens (pairs x longest pair) in one call.")
