"""Budget sweep: what each budget buys on an idle stack, cold (just started) and warmed.

Starts a real recall server, rerank replica (score cache off, so every budget pays for its pairs) and gateway
in this process, then searches one query at budgets from small to large. What "fits" is read from the stack
itself: the replica's published ms_per_pair (measured at its load) and recall's measured time.

    python -m twostage.bench.budget_sweep --index INDEX_DIR
"""

import argparse
import asyncio
import time
from dataclasses import dataclass

import grpc

BUDGETS_MS = (25, 50, 75, 100, 150, 200, 300, 400, 500)
QUERY = "homocysteine and vitamin B12"


@dataclass
class Row:
    budget_ms: int
    reranked: int
    degradation: str  # the degraded_reason, "DEADLINE_EXCEEDED" when refused, "" when whole
    recall_ms: float
    total_ms: float
    ms_per_pair: float = 0.0  # the replica's own recent cost per pair, as its answer reported it


@dataclass
class Sweep:
    ms_per_pair: float  # the replica's published (Info) cost per pair
    cold: list[Row]
    warm: list[Row]
    recall_ms: float  # recall's slowest answer in either sweep


class Stack:
    """Recall, rerank and gateway servers on loopback ports; stopped by ``close``."""

    def __init__(self, index_dir, recall_k: int = 20):
        self.index_dir = index_dir
        self.recall_k = recall_k
        self.servers = []
        self.channels = []

    async def start(self):
        from gateway.config import GatewaySettings
        from gateway.servicer import build_server as build_gateway
        from recall_server.config import RecallSettings
        from recall_server.service import RecallService
        from recall_server.servicer import build_server as build_recall
        from rerank_server.config import RerankSettings
        from rerank_server.service import RerankService
        from rerank_server.servicer import build_server as build_rerank
        from twostage.v1 import common_pb2, gateway_pb2_grpc, rerank_pb2_grpc

        recall = build_recall(RecallService(RecallSettings(port=0, index_dir=self.index_dir)))
        rerank = build_rerank(RerankService(RerankSettings(port=0, score_cache_mb=0)))
        self.servers += [recall, rerank]
        recall_port, rerank_port = await asyncio.gather(recall.start(), rerank.start())
        gateway = build_gateway(GatewaySettings(port=0, recall_targets=f"127.0.0.1:{recall_port}",
                                                rerank_targets=f"127.0.0.1:{rerank_port}"))
        self.servers.append(gateway)
        gateway_port = await gateway.start()
        info = await rerank_pb2_grpc.RerankStub(self._channel(rerank_port)).Info(common_pb2.InfoRequest())
        self.ms_per_pair = info.ms_per_pair
        self.stub = gateway_pb2_grpc.GatewayStub(self._channel(gateway_port))
        return self

    def _channel(self, port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return channel

    async def search(self, budget_ms: int, skip_rerank: bool = False) -> Row:
        from twostage.v1 import gateway_pb2

        request = gateway_pb2.SearchRequest(query=QUERY, recall_k=self.recall_k, top_k=10, budget_ms=budget_ms,
                                            skip_rerank=skip_rerank)
        started = time.monotonic()
        try:
            reply = await self.stub.Search(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            return Row(budget_ms, 0, "DEADLINE_EXCEEDED", 0.0, 1000 * (time.monotonic() - started))
        return Row(budget_ms, reply.reranked, reply.degraded_reason, reply.timings_ms["recall_ms"],
                   reply.timings_ms["total_ms"], reply.timings_ms.get("rerank.model_ms_per_pair", 0.0))

    async def sweep(self, budgets=BUDGETS_MS) -> list[Row]:
        return [await self.search(budget) for budget in budgets]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for server in reversed(self.servers):
            await server.stop(grace_s=1)


async def run(index_dir, budgets=BUDGETS_MS, warm_searches: int = 3) -> Sweep:
    stack = await Stack(index_dir).start()
    try:
        cold = await stack.sweep(budgets)
        for _ in range(warm_searches):  # warmed: the model has run on these pairs' shapes, the cost model has learned
            await stack.search(max(budgets))
        warm = await stack.sweep(budgets)
        recall_ms = max([r.recall_ms for r in cold + warm] + [(await stack.search(max(budgets), True)).recall_ms])
        return Sweep(stack.ms_per_pair, cold, warm, recall_ms)
    finally:
        await stack.close()


def table(sweep: Sweep) -> str:
    lines = [
        f"replica's published ms_per_pair: {sweep.ms_per_pair:.1f}; recall (slowest): {sweep.recall_ms:.0f} ms",
        "",
        "| budget ms | cold: reranked | cold: degradation | warm: reranked | warm: degradation |",
        "|---:|---:|---|---:|---|",
    ]
    for cold, warm in zip(sweep.cold, sweep.warm):
        lines.append(f"| {cold.budget_ms} | {cold.reranked} | {cold.degradation or '-'} | {warm.reranked} "
                     f"| {warm.degradation or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", required=True, help="a built index directory")
    args = parser.parse_args()
    print(table(asyncio.run(run(args.index))))


if __name__ == "__main__":
    main()
