"""gRPC edge of the gateway: protos in, dataclasses through, protos out."""

import grpc

from gateway.clients import RecallClient, RerankClient
from gateway.config import GatewaySettings
from gateway.pipeline import SearchPipeline, SearchQuery
from twostage import __version__
from twostage.server import GrpcService, deadline_of
from twostage.status import translate_errors
from twostage.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, pipeline: SearchPipeline):
        self.pipeline = pipeline

    @translate_errors
    async def Search(self, request: gateway_pb2.SearchRequest, context: grpc.aio.ServicerContext):
        result = await self.pipeline.search(
            SearchQuery(
                query=request.query,
                top_k=request.top_k,
                recall_k=request.recall_k,
                budget_ms=request.budget_ms,
                request_id=request.request_id,
                deadline_s=deadline_of(context),
            )
        )
        return gateway_pb2.SearchResponse(
            hits=[
                gateway_pb2.Hit(
                    id=h.id, title=h.title, text=h.text, score=h.score, rerank_score=h.rerank_score,
                    recall_rank=h.recall_rank, recall_score=h.recall_score,
                )
                for h in result.hits
            ],
            degraded=result.degraded,
            degraded_reason=result.degraded_reason,
            timings_ms=result.timings_ms,
            candidates=result.candidates,
            reranked=result.reranked,
            request_id=result.request_id,
        )

    @translate_errors
    async def Info(self, request: common_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        s = self.pipeline.settings
        return gateway_pb2.GatewayInfo(
            version=__version__,
            recall_targets=s.recall_target_list,
            rerank_targets=s.rerank_target_list,
            default_budget_ms=s.default_budget_ms,
            limits=[
                common_pb2.Limit(name=name, value=getattr(s, name))
                for name in ("max_top_k", "max_recall_k", "max_budget_ms", "max_query_chars")
            ],
        )


class GatewayLifecycle:
    """Opens channels to the tiers on start and closes them after draining."""

    def __init__(self, settings: GatewaySettings):
        self.pipeline = SearchPipeline(
            settings,
            [RecallClient(t) for t in settings.recall_target_list],
            [RerankClient(t) for t in settings.rerank_target_list],
        )

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self.pipeline.close()


def build_server(settings: GatewaySettings) -> GrpcService:
    """The GrpcService for a gateway (not yet started)."""
    lifecycle = GatewayLifecycle(settings)
    return GrpcService(
        "gateway",
        settings,
        [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name],
        lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(lifecycle.pipeline), server),
        lifecycle,
    )
