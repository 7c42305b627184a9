"""gRPC edge of the gateway: protos in, dataclasses through, protos out."""

import logging

import grpc

from gateway.config import GatewaySettings
from gateway.embedding import EmbedTextsQuery
from gateway.lifecycle import GatewayLifecycle
from gateway.pipeline import RerankTextsQuery, SearchQuery
from gateway.writes import WriteResult
from twostage import __version__
from twostage.auth import caller_may_see_internals
from twostage.convert import (
    document_from_proto,
    document_to_proto,
    filter_from_proto,
    fusion_calibration_to_proto,
    fusion_from_proto,
    fusion_to_proto,
    metadata_to_proto,
    recall_mode_from_proto,
)
from twostage.server import GrpcService, deadline_of
from twostage.status import translate_errors
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)


def _write_fields(result: WriteResult) -> dict:
    """What Upsert and Delete replies share: counts, version, acknowledgements per shard."""
    return {
        "doc_count": result.doc_count,
        "timings_ms": result.timings_ms,
        "version": common_pb2.WriteVersion(clock=result.version.clock, writer=result.version.writer),
        "shards": [common_pb2.ShardAck(shard=a.shard, documents=a.documents, acknowledged=a.acknowledged,
                                       replicas=a.replicas) for a in result.shards],
        "request_id": result.request_id,
        "superseded": result.superseded,
        **({"newest_version": common_pb2.WriteVersion(clock=result.newest.clock, writer=result.newest.writer)}
           if result.newest is not None else {}),
    }


def _degradations(result) -> list[gateway_pb2.Degradation]:
    return [gateway_pb2.Degradation(code=gateway_pb2.DegradationCode.Value(d.code.name), detail=d.detail)
            for d in result.degradations]


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, lifecycle: "GatewayLifecycle"):
        self.lifecycle = lifecycle

    @translate_errors
    async def Search(self, request: gateway_pb2.SearchRequest, context: grpc.aio.ServicerContext):
        result = await self.lifecycle.ready_pipeline().search(
            SearchQuery(
                query=request.query,
                top_k=request.top_k,
                recall_k=request.recall_k,
                budget_ms=request.budget_ms,
                request_id=request.request_id,
                deadline_s=deadline_of(context),
                fusion=fusion_from_proto(request.fusion),
                fusion_alpha=request.fusion_alpha if request.HasField("fusion_alpha") else None,
                skip_rerank=request.skip_rerank,
                score_threshold=request.score_threshold if request.HasField("score_threshold") else None,
                recall_mode=recall_mode_from_proto(request.recall_mode),
                filter=filter_from_proto(request.filter),
                prf_depth=request.prf_depth if request.HasField("prf_depth") else None,
                prf_weight=request.prf_weight if request.HasField("prf_weight") else None,
            )
        )
        reply = gateway_pb2.SearchResponse(
            degraded=result.degraded,
            degraded_reason=result.degraded_reason,
            degradations=_degradations(result),
            timings_ms=result.timings_ms,
            candidates=result.candidates,
            reranked=result.reranked,
            rerank_cached=result.rerank_cached if result.reranked else 0,
            request_id=result.request_id,
        )
        add = reply.hits.add  # in place: a hit made apart is copied, text and all, when the reply takes it
        for h in result.hits:
            add(id=h.id, title=h.title, text=h.text, score=h.score, rerank_score=h.rerank_score,
                recall_rank=h.recall_rank, recall_score=h.recall_score,
                metadata=metadata_to_proto(h.metadata) if h.metadata else None, relevance=h.relevance,
                dense_score=h.dense_score, lexical_score=h.lexical_score)
        return reply

    @translate_errors
    async def Rerank(self, request: gateway_pb2.RerankTextsRequest, context: grpc.aio.ServicerContext):
        result = await self.lifecycle.ready_pipeline().rerank_texts(RerankTextsQuery(
            query=request.query, documents=list(request.documents), top_n=request.top_n, budget_ms=request.budget_ms,
            request_id=request.request_id, deadline_s=deadline_of(context), model=request.model))
        return gateway_pb2.RerankTextsResponse(
            results=[gateway_pb2.RankedText(index=r.index, score=r.score, relevance=r.relevance)
                     for r in result.results],
            degraded=result.degraded,
            degraded_reason=result.degraded_reason,
            degradations=_degradations(result),
            timings_ms=result.timings_ms,
            scored=result.scored,
            cached=result.cached,
            request_id=result.request_id,
            model=result.model,
            tokens=result.tokens,
        )

    @translate_errors
    async def Embed(self, request: gateway_pb2.EmbedTextsRequest, context: grpc.aio.ServicerContext):
        result = await self.lifecycle.ready_embedder().embed(EmbedTextsQuery(
            texts=list(request.texts), is_query=request.is_query, model=request.model, dimensions=request.dimensions,
            normalize=request.normalize or None, budget_ms=request.budget_ms, request_id=request.request_id,
            deadline_s=deadline_of(context)))
        return gateway_pb2.EmbedTextsResponse(
            embeddings=[gateway_pb2.Vector(values=v) for v in result.vectors.tolist()],
            dims=result.vectors.shape[1], model=result.model, tokens=result.tokens, timings_ms=result.timings_ms,
            request_id=result.request_id)

    def _write_timeout_s(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        limit = self.lifecycle.settings.write_timeout_s
        return limit if remaining is None else min(limit, remaining)

    @translate_errors
    async def Upsert(self, request: common_pb2.UpsertRequest, context: grpc.aio.ServicerContext):
        docs = [document_from_proto(d) for d in request.documents]
        result = await self.lifecycle.ready_router().upsert(docs, self._write_timeout_s(context), request.request_id)
        return common_pb2.UpsertResponse(upserted=result.count, **_write_fields(result))

    @translate_errors
    async def Delete(self, request: common_pb2.DeleteRequest, context: grpc.aio.ServicerContext):
        result = await self.lifecycle.ready_router().delete(list(request.ids), self._write_timeout_s(context),
                                                            request.request_id)
        return common_pb2.DeleteResponse(deleted=result.count, **_write_fields(result))

    @translate_errors
    async def Get(self, request: common_pb2.GetRequest, context: grpc.aio.ServicerContext):
        found, missing = await self.lifecycle.ready_router().get(list(request.ids), self._write_timeout_s(context))
        return common_pb2.GetResponse(documents=[document_to_proto(d) for d in found], missing=missing)

    @translate_errors
    async def Info(self, request: common_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        info = info_fields(self.lifecycle)
        return gateway_pb2.GatewayInfo(
            **{**info, "default_fusion": fusion_to_proto(info["default_fusion"]),
               "calibration": fusion_calibration_to_proto(info["calibration"]),
               "limits": [common_pb2.Limit(name=name, value=value) for name, value in info["limits"].items()]})


def info_fields(lifecycle: GatewayLifecycle) -> dict:
    """GatewayInfo's fields (fusion by name, calibration as a ``Calibration``, limits as a dict), for gRPC's Info
    and HTTP's /v1/info."""
    pipeline = lifecycle.ready_pipeline()
    s = pipeline.settings
    internals = caller_may_see_internals()  # addresses are for operators (admin), not search clients
    return {
        "version": __version__,
        "recall_targets": [shard.target.spec for shard in pipeline.recall] if internals else [],
        "rerank_targets": [r.target for r in pipeline.rerank.replicas] if internals else [],
        "default_budget_ms": s.default_budget_ms,
        "default_fusion": s.fusion,
        "default_fusion_alpha": s.fusion_alpha,
        "default_top_k": s.default_top_k,
        "default_recall_k": s.default_recall_k,
        "calibration": pipeline.calibration_in_use,
        "limits": {"max_top_k": s.max_top_k, "max_budget_ms": s.max_budget_ms, "max_recall_k": pipeline.max_recall_k(),
                   "max_query_chars": pipeline.max_query_chars()},
    }


def build_server(settings: GatewaySettings) -> GrpcService:
    """The GrpcService for a gateway (not yet started)."""
    lifecycle = GatewayLifecycle(settings)
    service = GrpcService(
        "gateway",
        settings,
        [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name],
        lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(lifecycle), server),
        lifecycle,
    )
    if settings.http_port is not None:
        from gateway.http import HttpFace

        service.add_listener(HttpFace(service, lifecycle))
    return service
