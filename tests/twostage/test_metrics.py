"""Every service exposes Prometheus metrics; the named series appear after traffic."""

import asyncio
import socket
import urllib.request

import grpc

from gateway.config import GatewaySettings
from gateway.servicer import build_server as build_gateway
from twostage.v1 import gateway_pb2, gateway_pb2_grpc


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_metrics_endpoint_after_traffic(recall_target, rerank_target):
    metrics_port = free_port()
    gateway = build_gateway(GatewaySettings(port=0, metrics_port=metrics_port, recall_targets=recall_target,
                                            rerank_targets=rerank_target))
    port = await gateway.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            await stub.Search(gateway_pb2.SearchRequest(query="folic acid", recall_k=6, top_k=3))
            await stub.Search(gateway_pb2.SearchRequest(query="folic acid", recall_k=50, budget_ms=60))
        text = await asyncio.to_thread(scrape, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        await gateway.stop(grace_s=1)
    for series in (
        'twostage_rpc_requests_total{code="OK",method="Gateway/Search",protocol="grpc"}',
        'twostage_rpc_requests_total{code="OK",method="Rerank/Rerank",protocol="grpc"}',
        'twostage_rpc_latency_seconds_bucket{le="0.001",method="Recall/Search",protocol="grpc"}',
        "twostage_batch_size_items_bucket",
        'twostage_batcher_padding_waste_ratio{batcher="rerank"}',
        'twostage_batcher_shed_items_total{batcher="rerank"}',
        "twostage_batch_queue_wait_seconds_bucket",
        'twostage_gateway_stage_seconds_bucket{le="0.005",stage="recall"}',
        "twostage_gateway_rerank_depth_bucket",
        "twostage_gateway_promotion_depth_bucket",
        "twostage_gateway_degraded_total{reason=",
    ):
        assert series in text, series
