"""Budget sweep: what each budget buys on an idle stack, cold (just started) and warmed.

Starts a real recall server, rerank replica (score cache off, so every budget pays for its pairs) and gateway
in this process, then searches one query at budgets from small to large. Beside the gateway's answers it
times the replica directly (Rerank calls with the query's own top candidates, the median of several), so
what a budget affords can be judged by the replica's real speed, not by the cost model under test.

    python -m twostage.bench.budget_sweep --index INDEX_DIR [--query TEXT]
"""

import argparse
import asyncio
import statistics
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


@dataclass
class Published:
    """The replica's cost model as its Info says."""

    ms_per_pair: float  # a pair of max_length tokens
    pair_fixed_ms: float
    pair_ms_per_token: float
    cost_ratio: float
    chars_per_token: float

    @classmethod
    def of(cls, info) -> "Published":
        return cls(info.ms_per_pair, info.pair_fixed_ms, info.pair_ms_per_token, info.cost_ratio,
                   info.chars_per_token)

    def __str__(self) -> str:
        return (f"{self.pair_fixed_ms:.1f} ms + {self.pair_ms_per_token:.3f} ms/token a pair "
                f"({self.ms_per_pair:.1f} ms at max_length), live ratio {self.cost_ratio:.2f}, "
                f"{self.chars_per_token:.2f} chars/token")


@dataclass
class Sweep:
    published: Published  # the replica's Info when the gateway started
    cold: list[Row]
    warm: list[Row]
    recall_ms: float  # recall's slowest answer in either sweep
    cold_pair_ms: float = 0.0  # the replica's real cost per pair of this query's candidates, after the cold sweep
    warm_pair_ms: float = 0.0  # the same after the warm sweep
    published_after: Published | None = None  # the replica's Info at the end

    @property
    def ms_per_pair(self) -> float:
        return self.published.ms_per_pair


class Stack:
    """Recall, rerank and gateway servers on loopback ports; stopped by ``close``."""

    def __init__(self, index_dir, recall_k: int = 20, query: str = QUERY):
        self.index_dir = index_dir
        self.recall_k = recall_k
        self.query = query
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
        from twostage.v1 import gateway_pb2_grpc, rerank_pb2_grpc

        recall = build_recall(RecallService(RecallSettings(port=0, index_dir=self.index_dir)))
        rerank = build_rerank(RerankService(RerankSettings(port=0, score_cache_mb=0)))
        self.servers += [recall, rerank]
        recall_port, rerank_port = await asyncio.gather(recall.start(), rerank.start())
        gateway = build_gateway(GatewaySettings(port=0, recall_targets=f"127.0.0.1:{recall_port}",
                                                rerank_targets=f"127.0.0.1:{rerank_port}"))
        self.servers.append(gateway)
        gateway_port = await gateway.start()
        self.rerank_stub = rerank_pb2_grpc.RerankStub(self._channel(rerank_port))
        self.published = await self.info()
        self.stub = gateway_pb2_grpc.GatewayStub(self._channel(gateway_port))
        return self

    async def info(self) -> Published:
        from twostage.v1 import common_pb2

        return Published.of(await self.rerank_stub.Info(common_pb2.InfoRequest()))

    async def drain(self) -> None:
        """Return once the replica's model is free: work a late search left there is done."""
        from twostage.v1 import rerank_pb2

        await self.rerank_stub.Rerank(rerank_pb2.RerankRequest(query="drain", documents=["d"], bypass_cache=True),
                                      timeout=60)

    async def pair_ms(self, pairs: int = 8, repeats: int = 5) -> float:
        """The replica's real cost per pair for this query's top candidates, timed here on direct Rerank calls
        (transport and tokenising included): the median of ``repeats`` calls of ``pairs`` pairs each."""
        from twostage.corpus import Document, document_text
        from twostage.v1 import gateway_pb2, rerank_pb2

        if not getattr(self, "candidates", None):
            reply = await self.stub.Search(gateway_pb2.SearchRequest(
                query=self.query, recall_k=self.recall_k, top_k=self.recall_k, budget_ms=30_000, skip_rerank=True))
            self.candidates = [document_text(Document(h.id, h.title, h.text)) for h in reply.hits]
        documents = self.candidates[:pairs]
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            await self.rerank_stub.Rerank(rerank_pb2.RerankRequest(query=self.query, documents=documents,
                                                                   bypass_cache=True), timeout=60)
            times.append(1000 * (time.perf_counter() - started) / len(documents))
        return statistics.median(times)

    def _channel(self, port: int) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.channels.append(channel)
        return channel

    async def search(self, budget_ms: int, skip_rerank: bool = False) -> Row:
        from twostage.v1 import gateway_pb2

        request = gateway_pb2.SearchRequest(query=self.query, recall_k=self.recall_k, top_k=10, budget_ms=budget_ms,
                                            skip_rerank=skip_rerank)
        started = time.monotonic()
        try:
            reply = await self.stub.Search(request, timeout=30)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
            return Row(budget_ms, 0, "DEADLINE_EXCEEDED", 0.0, 1000 * (time.monotonic() - started))
        return Row(budget_ms, reply.reranked, reply.degraded_reason, reply.timings_ms["recall_ms"],
                   reply.timings_ms["total_ms"])

    async def sweep(self, budgets=BUDGETS_MS) -> list[Row]:
        return [await self.search(budget) for budget in budgets]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        for server in reversed(self.servers):
            await server.stop(grace_s=1)


async def run(index_dir, budgets=BUDGETS_MS, warm_searches: int = 3, query: str = QUERY) -> Sweep:
    stack = await Stack(index_dir, query=query).start()
    try:
        cold = await stack.sweep(budgets)
        cold_pair_ms = await stack.pair_ms()
        for _ in range(warm_searches):  # warmed: the model has run on these pairs' shapes, the cost model has learned
            await stack.search(max(budgets))
        warm = await stack.sweep(budgets)
        warm_pair_ms = await stack.pair_ms()
        recall_ms = max([r.recall_ms for r in cold + warm] + [(await stack.search(max(budgets), True)).recall_ms])
        return Sweep(stack.published, cold, warm, recall_ms, cold_pair_ms, warm_pair_ms, await stack.info())
    finally:
        await stack.close()


def table(sweep: Sweep) -> str:
    lines = [
        f"replica's published cost at the gateway's start: {sweep.published}",
        *([f"and at the end: {sweep.published_after}"] if sweep.published_after else []),
        (f"real cost per pair of the query's top candidates (direct Rerank calls, median): "
         f"{sweep.cold_pair_ms:.1f} ms after the cold sweep, {sweep.warm_pair_ms:.1f} ms after the warm one; "
         f"recall (slowest): {sweep.recall_ms:.0f} ms"),
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
    parser.add_argument("--query", default=QUERY, help="the query searched at every budget")
    args = parser.parse_args()
    print(table(asyncio.run(run(args.index, query=args.query))))


if __name__ == "__main__":
    main()
