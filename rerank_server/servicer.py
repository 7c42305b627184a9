"""gRPC edge of the rerank service: protos in, dataclasses through, protos out."""

import time

import grpc

from rerank_server.service import RerankQuery, RerankService
from twostage import __version__
from twostage.convert import cost_to_proto
from twostage.server import GrpcService, deadline_of
from twostage.status import translate_errors
from twostage.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc


class RerankServicer(rerank_pb2_grpc.RerankServicer):
    def __init__(self, service: RerankService):
        self.service = service

    @translate_errors
    async def Rerank(self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        outcome = await self.service.rerank(
            RerankQuery(
                query=request.query,
                documents=list(request.documents),
                top_n=request.top_n,
                model=request.model,
                deadline_s=deadline_of(context),
                bypass_cache=request.bypass_cache,
                allow_partial=request.allow_partial,
                refuse_truncation=request.refuse_truncation,
            )
        )
        reply = rerank_pb2.RerankResponse(
            tokens=outcome.tokens,
            queue_items=outcome.queue_items,
            query_truncated=outcome.query_truncated,
            cached=outcome.cached,
            unscored=outcome.unscored,
            cost_ratio=outcome.cost_ratio,
            cost=cost_to_proto(outcome.cost),
        )
        add = reply.results.add  # in place: a result made apart is copied when the reply takes it
        for index, score in outcome.ranked:
            add(index=index, score=score)
        # total_ms covers the whole handler, so callers can tell transport from work.
        reply.timings_ms.update({**outcome.timings_ms, "total_ms": 1000 * (time.perf_counter() - start)})
        return reply

    @translate_errors
    async def Info(self, request: common_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        info = self.service.info()
        return rerank_pb2.RerankInfo(
            version=__version__,
            model=info["model"],
            max_length=info["max_length"],
            execution_provider=info["execution_provider"],
            execution_plan=info["execution_plan"],
            limits=[common_pb2.Limit(name=k, value=v) for k, v in info["limits"].items()],
            ms_per_pair=info["ms_per_pair"],
            pair_fixed_ms=info["pair_fixed_ms"],
            pair_ms_per_token=info["pair_ms_per_token"],
            cost_ratio=info["cost_ratio"],
            chars_per_token=info["chars_per_token"],
        )


def build_server(service: RerankService):
    """The GrpcService for a rerank server (not yet started)."""
    return GrpcService(
        "rerank",
        service.settings,
        [rerank_pb2.DESCRIPTOR.services_by_name["Rerank"].full_name],
        lambda server: rerank_pb2_grpc.add_RerankServicer_to_server(RerankServicer(service), server),
        service,
    )
