"""``twostage search "<query>"``: ask a gateway and print the hits."""

import argparse
import json
import sys
import textwrap

import grpc
from google.protobuf.json_format import MessageToDict

from twostage.cli.args import non_negative_int, positive_float
from twostage.cli.client import add_target_flag, explain
from twostage.connect import PLAINTEXT, Credentials, credentials_from_args
from twostage.convert import filter_to_proto, fusion_to_proto, metadata_from_proto, recall_mode_to_proto
from twostage.errors import InvalidArgument
from twostage.filters import parse_filter
from twostage.recall_mode import RecallMode
from twostage.scoring import Fusion
from twostage.v1 import gateway_pb2, gateway_pb2_grpc


def register(commands) -> None:
    parser = commands.add_parser("search", help="search through a running gateway")
    parser.add_argument("query")
    add_target_flag(parser)
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="hits to return (0: server default)")
    parser.add_argument("--recall-k", type=non_negative_int, default=0, help="candidates to recall (0: server default)")
    parser.add_argument("--budget-ms", type=non_negative_int, default=0, help="latency budget (0: server default)")
    parser.add_argument("--timeout-s", type=positive_float, default=60.0, help="client deadline")
    parser.add_argument("--filter", action="append", default=[], metavar="FILTER",
                        help="only documents whose metadata passes: price<=100, tags=travel, 'category in garden,"
                             "outdoor', or JSON such as '{\"price\": {\"lte\": 100}}'; repeat to require several")
    parser.add_argument("--recall-mode", type=RecallMode, choices=sorted(RecallMode),
                        help="dense, lexical or hybrid recall (default: the recall servers')")
    parser.add_argument("--score-threshold", type=float, help="drop hits whose final score is below this")
    parser.add_argument("--skip-rerank", action="store_true", help="answer from recall alone")
    parser.add_argument("--fusion", choices=sorted(f.value for f in Fusion), help="how the final score combines recall and rerank "
                        "(default: the gateway's)")
    parser.add_argument("--alpha", type=unit_float, help="weight of rerank in the fusion, 0-1 (default: the gateway's)")
    parser.add_argument("--prf-depth", type=non_negative_int,
                        help="pseudo-relevance feedback from this many top recall hits; 0: off (default: recall's)")
    parser.add_argument("--prf-weight", type=unit_float,
                        help="the top hits' share in the refined query vector, 0-1 (default: recall's)")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    parser.set_defaults(run=run)


def search(target: str, request: gateway_pb2.SearchRequest, timeout_s: float,
           credentials: Credentials = PLAINTEXT) -> gateway_pb2.SearchResponse:
    with credentials.channel(target) as channel:
        return gateway_pb2_grpc.GatewayStub(channel).Search(request, timeout=timeout_s, metadata=credentials.metadata)


def response_as_dict(response: gateway_pb2.SearchResponse) -> dict:
    result = MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    result["timings"] = result.pop("timings_ms")
    for hit, proto in zip(result["hits"], response.hits):
        hit.setdefault("rerank_score", None)
        hit["metadata"] = metadata_from_proto(proto.metadata)  # plain values, not the oneof wrapper
    return result


def format_response(response: gateway_pb2.SearchResponse) -> str:
    lines = [f"{'#':>3} {'score':>8} {'rerank':>8} {'recall#':>7}  id / title"]
    for rank, hit in enumerate(response.hits, 1):
        rerank = f"{hit.rerank_score:8.3f}" if hit.HasField("rerank_score") else f"{'-':>8}"
        title = textwrap.shorten(hit.title or hit.text, 70)
        lines.append(f"{rank:>3} {hit.score:8.3f} {rerank} {hit.recall_rank:>7}  {hit.id}: {title}")
        if hit.metadata:
            pairs = ", ".join(f"{k}={v}" for k, v in sorted(metadata_from_proto(hit.metadata).items()))
            lines.append(f"{'':>37}{textwrap.shorten(pairs, 70)}")
    timings = ", ".join(f"{k} {v:.1f}" for k, v in sorted(response.timings_ms.items()))
    lines.append(f"{response.reranked} of {response.candidates} candidates reranked; timings (ms): {timings}")
    if response.degraded:
        lines.append(f"DEGRADED: {response.degraded_reason}")
    return "\n".join(lines)


def unit_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def build_request(args) -> gateway_pb2.SearchRequest:
    """The request the flags describe; InvalidArgument names a filter that does not parse."""
    request = gateway_pb2.SearchRequest(
        query=args.query, top_k=args.top_k, recall_k=args.recall_k, budget_ms=args.budget_ms,
        skip_rerank=args.skip_rerank, recall_mode=recall_mode_to_proto(args.recall_mode),
        filter=filter_to_proto(parse_filter(args.filter)),
    )
    if args.score_threshold is not None:
        request.score_threshold = args.score_threshold
    if args.fusion:
        request.fusion = fusion_to_proto(args.fusion)
    if args.alpha is not None:
        request.fusion_alpha = args.alpha
    if args.prf_depth is not None:
        request.prf_depth = args.prf_depth
    if args.prf_weight is not None:
        request.prf_weight = args.prf_weight
    return request


def run(args) -> int:
    try:
        request = build_request(args)
    except InvalidArgument as error:
        print(f"twostage: search: {error}", file=sys.stderr)
        return 2
    try:
        response = search(args.target, request, args.timeout_s, credentials_from_args(args))
    except grpc.RpcError as error:
        print(f"twostage: search failed: {explain(error, args.target)}", file=sys.stderr)
        return 1
    print(json.dumps(response_as_dict(response), indent=2) if args.json else format_response(response))
    return 0
