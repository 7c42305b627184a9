"""Recall server settings: env prefix TWOSTAGE_RECALL_, or CLI flags."""

from pathlib import Path

import platformdirs
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from twostage.config import BatchingSettings, RuntimeSettings, ServiceSettings
from twostage.documents import DocumentLimits
from twostage.model_store import DEFAULT_EMBED_MODEL

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
    max_upsert_docs: int = Field(1000, ge=1, description="Most documents in one Upsert or Delete request.")
    max_doc_chars: int = Field(100_000, ge=1, description="Longest document title + text accepted.")
    max_id_chars: int = Field(256, ge=1, le=4096, description="Longest document id accepted.")
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
