"""Gateway settings: env prefix TWOSTAGE_GATEWAY_, or CLI flags."""

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from twostage.config import ServiceSettings


def split_targets(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="TWOSTAGE_GATEWAY_", frozen=True, extra="forbid")

    port: int = Field(50051, description="Port to bind; 0 picks a free one.")
    recall_targets: str = Field(
        "127.0.0.1:50052", description="Comma-separated recall shards (host:port); every shard is queried."
    )
    rerank_targets: str = Field(
        "127.0.0.1:50053", description="Comma-separated rerank replicas (host:port); requests are spread over them."
    )
    default_top_k: int = Field(10, description="Hits returned when a request leaves top_k at 0.")
    default_recall_k: int = Field(100, description="Candidates recalled when a request leaves recall_k at 0.")
    max_top_k: int = Field(100, description="Largest top_k accepted.")
    max_recall_k: int = Field(1000, description="Largest recall_k accepted.")
    default_budget_ms: int = Field(
        10_000,
        description="Budget when a request sets none. On 2 CPU cores the default reranker scores about "
        "30 pairs/s, so reranking 100 candidates takes about 3.5 s; on a GPU 200 ms is ample.",
    )
    max_budget_ms: int = Field(60_000, description="Budgets above this are lowered to it.")
    return_margin_ms: float = Field(
        10.0, description="Time kept back from rerank for building and sending the response."
    )
    min_rerank_ms: float = Field(
        20.0, description="If less than this is left after recall, rerank is skipped (degraded: rerank_skipped)."
    )
    max_query_chars: int = Field(2048, description="Longest query accepted.")

    @property
    def recall_target_list(self) -> list[str]:
        return split_targets(self.recall_targets)

    @property
    def rerank_target_list(self) -> list[str]:
        return split_targets(self.rerank_targets)
