"""Clients for the recall and rerank tiers: the gateway's edge toward them.

They speak protos to the wire and plain values to the pipeline, and turn RPC
failures into domain errors.
"""

from dataclasses import dataclass, field

import grpc

from twostage.convert import document_from_proto, document_to_proto, metadata_from_proto
from twostage.corpus import Document, MetadataValue
from twostage.status import error_from_rpc
from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc, rerank_pb2, rerank_pb2_grpc


@dataclass(frozen=True)
class RecallCandidate:
    id: str
    title: str
    text: str
    score: float
    metadata: dict[str, MetadataValue] = field(default_factory=dict)


@dataclass(frozen=True)
class RerankReply:
    scores: dict[int, float]  # candidate position -> score
    timings_ms: dict[str, float]
    tokens: int
    queue_items: int


# A DNS name may resolve to many replicas (a headless Service): spread calls over all of them.
_CHANNEL_OPTIONS = [("grpc.lb_policy_name", "round_robin"), ("grpc.enable_retries", 0)]


class _Client:
    def __init__(self, target: str):
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)

    async def close(self) -> None:
        await self.channel.close()


class RecallClient(_Client):
    def __init__(self, target: str):
        super().__init__(target)
        self.stub = recall_pb2_grpc.RecallStub(self.channel)

    async def search(
        self, query: str, k: int, timeout_s: float, request_id: str
    ) -> tuple[list[RecallCandidate], dict[str, float]]:
        try:
            reply = await self.stub.Search(
                recall_pb2.RecallSearchRequest(query=query, k=k, request_id=request_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, f"recall {self.target}") from None
        candidates = [
            RecallCandidate(c.id, c.title, c.text, c.score, metadata_from_proto(c.metadata)) for c in reply.candidates
        ]
        return candidates, dict(reply.timings_ms)

    async def _call(self, method, request, timeout_s: float | None):
        try:
            return await method(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, f"recall {self.target}") from None

    async def upsert(self, docs: list[Document], timeout_s: float | None) -> tuple[int, int]:
        """(upserted, doc_count)."""
        request = common_pb2.UpsertRequest(documents=[document_to_proto(d) for d in docs])
        reply = await self._call(self.stub.Upsert, request, timeout_s)
        return reply.upserted, reply.doc_count

    async def delete(self, ids: list[str], timeout_s: float | None) -> tuple[int, int]:
        """(deleted, doc_count)."""
        reply = await self._call(self.stub.Delete, common_pb2.DeleteRequest(ids=ids), timeout_s)
        return reply.deleted, reply.doc_count

    async def get(self, ids: list[str], timeout_s: float | None) -> list[Document]:
        reply = await self._call(self.stub.Get, common_pb2.GetRequest(ids=ids), timeout_s)
        return [document_from_proto(d) for d in reply.documents]


class RerankClient(_Client):
    def __init__(self, target: str):
        super().__init__(target)
        self.stub = rerank_pb2_grpc.RerankStub(self.channel)

    async def rerank(self, query: str, documents: list[str], timeout_s: float, request_id: str) -> RerankReply:
        try:
            reply = await self.stub.Rerank(
                rerank_pb2.RerankRequest(query=query, documents=documents, request_id=request_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, f"rerank {self.target}") from None
        return RerankReply(
            scores={r.index: r.score for r in reply.results},
            timings_ms=dict(reply.timings_ms),
            tokens=reply.tokens,
            queue_items=reply.queue_items,
        )
