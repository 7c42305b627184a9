"""Why an answer is not the full two-stage ranking: codes that programs read
(metrics, evaluation, load tests, frontends), each with a detail for people.
Mirrors the proto's DegradationCode by name."""

import enum
from dataclasses import dataclass


class DegradationCode(enum.Enum):
    RERANK_PARTIAL = "rerank_partial"
    RERANK_SKIPPED = "rerank_skipped"
    RERANK_TIMEOUT = "rerank_timeout"
    RERANK_OVERLOADED = "rerank_overloaded"
    RERANK_UNAVAILABLE = "rerank_unavailable"
    RECALL_PARTIAL = "recall_partial"
    QUERY_TRUNCATED = "query_truncated"
    PRF_SKIPPED = "prf_skipped"


@dataclass(frozen=True)
class Degradation:
    code: DegradationCode
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.code.value} ({self.detail})" if self.detail else self.code.value


class Degradable:
    """An answer that may be cut short: its dataclass holds ``degradations``."""

    degradations: list[Degradation]

    def degrade(self, code: DegradationCode, detail: str = "") -> None:
        self.degradations.append(Degradation(code, detail))

    @property
    def degraded(self) -> bool:
        return bool(self.degradations)

    @property
    def degraded_reason(self) -> str:
        return "; ".join(map(str, self.degradations))
