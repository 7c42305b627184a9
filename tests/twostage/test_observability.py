"""What an operator sees: the traces of real searches across the three processes (received by an OTLP
receiver inside the test), exemplars that lead from a latency bucket to a trace, log lines that name their
trace, and a dashboard and alerts whose every query names metrics and labels the servers really export."""

import asyncio
import json
import logging
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import promql_parser
import pytest
import yaml
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.twostage.test_cli import free_port_run
from twostage import tracing
from twostage.bench.otlp import OtlpReceiver
from twostage.stack import Stack
from twostage.v1 import gateway_pb2, gateway_pb2_grpc

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
SERVER, CLIENT = 2, 3  # OTLP span kinds
# Labels Prometheus gives a target (the PodMonitor's pod and namespace, the scrape's job and instance).
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "endpoint", "service"}
LONG_QUERY = "cell " * 400  # past the reranker's query length: answered, degraded query_truncated


@pytest.fixture(scope="module")
async def traced_stack(tmp_path_factory, built_index):
    """Gateway, recall and rerank as processes exporting every span to a receiver in this test, with metrics."""
    index = tmp_path_factory.mktemp("traced") / "index"
    shutil.copytree(built_index, index)
    receiver = OtlpReceiver().start()
    base = free_port_run(6)
    stack = Stack("127.0.0.1", base, str(index), metrics_port=base + 3)
    with pytest.MonkeyPatch.context() as env:  # the children read it when they start
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export within 0.1 s, not 5
        env.delenv("OTEL_TRACES_SAMPLER", raising=False)  # parent-based, always on
        env.delenv("OTEL_SERVICE_NAME", raising=False)
        async with stack.running(180):
            yield stack, receiver
    receiver.stop()


async def search(stack: Stack, request_id: str, query: str = "homocysteine and vitamin B12", **fields):
    async with grpc.aio.insecure_channel(stack.gateway_target) as channel:
        return await gateway_pb2_grpc.GatewayStub(channel).Search(gateway_pb2.SearchRequest(
            query=query, request_id=request_id, recall_k=8, top_k=3, budget_ms=60_000, **fields))


def trace_of(spans, request_id: str) -> str | None:
    return next((s.trace_id for s in spans if s.name == "search" and s.attributes.get("twostage.request_id")
                 == request_id), None)


async def received_trace(receiver: OtlpReceiver, request_id: str, batches: bool = True) -> list:
    """Every span of the search ``request_id``, once its three processes' spans (and with ``batches``, the model
    batches that served its rerank calls: pairs the score cache answered have none) have arrived."""

    def complete(spans) -> bool:
        trace_id = trace_of(spans, request_id)
        mine = [s for s in spans if s.trace_id == trace_id]
        # A process exports its spans as they end, children first: each hop's server span comes last.
        calls = [s for s in mine if s.kind == CLIENT and s.name == "twostage.v1.Rerank/Rerank"]
        served = {s.span_id for s in mine if s.kind == SERVER and s.service == "twostage-rerank"}
        batched = {span_id for s in spans if s.name == "model batch" for _, span_id in s.links}
        return (trace_id is not None and any(not s.parent_span_id for s in mine)
                and any(s.kind == SERVER and s.service == "twostage-recall" for s in mine)
                and len(served) == len(calls) and (served <= batched or not batches))

    spans = await asyncio.to_thread(receiver.wait_for, complete)
    return [s for s in spans if s.trace_id == trace_of(spans, request_id)]


async def test_one_search_is_one_trace_from_the_gateway_to_each_model_batch(traced_stack):
    stack, receiver = traced_stack
    reply = await search(stack, "traced-1")
    assert reply.reranked > 0 and not reply.degraded
    spans = await received_trace(receiver, "traced-1")
    by_id = {s.span_id: s for s in spans}

    def parent(span):
        return by_id.get(span.parent_span_id)

    (root,) = [s for s in spans if not s.parent_span_id]
    assert (root.service, root.kind, root.name) == ("twostage-gateway", SERVER, "twostage.v1.Gateway/Search")
    (search_span,) = [s for s in spans if s.name == "search"]
    assert parent(search_span) is root and search_span.attributes["twostage.recall_k"] == 8
    assert search_span.attributes["twostage.reranked"] == reply.reranked
    assert search_span.attributes["twostage.degradations"] == []
    assert 0 < search_span.attributes["twostage.budget_used"] < 1
    (recall,) = [s for s in spans if s.name == "recall"]
    (rerank,) = [s for s in spans if s.name == "rerank"]
    assert parent(recall) is search_span and parent(rerank) is search_span
    rounds = [s for s in spans if s.name == "rerank round"]
    assert rounds and all(parent(r) is rerank for r in rounds)
    assert sorted(r.attributes["twostage.round"] for r in rounds) == list(range(len(rounds)))

    # Recall: gateway client span -> recall server span -> embed, dense search, lexical search, fusion.
    (recall_server,) = [s for s in spans if s.service == "twostage-recall" and s.kind == SERVER]
    assert parent(recall_server).kind == CLIENT and parent(parent(recall_server)) is recall
    assert recall_server.attributes["twostage.shard"] == 0 and recall_server.attributes["twostage.replica"]
    steps = {s.name for s in spans if parent(s) is recall_server}
    assert {"embed", "dense search", "lexical search", "fusion"} <= steps

    # Rerank: each call is a client span of a round, and the rerank server's span its child.
    rerank_servers = [s for s in spans if s.service == "twostage-rerank" and s.kind == SERVER]
    assert rerank_servers and all(parent(parent(s)) in rounds for s in rerank_servers)
    assert sum(s.attributes["twostage.documents"] for s in rerank_servers) >= reply.reranked
    for server in rerank_servers:
        assert {"tokenize", "queue wait"} <= {s.name for s in spans if parent(s) is server}

    # Each model batch links to every request it served, and lives in the trace of one of them.
    batches = [s for s in receiver.spans if s.name == "model batch" and s.attributes["twostage.batcher"] == "rerank"
               and {span_id for _, span_id in s.links} & {r.span_id for r in rerank_servers}]
    linked = {link for batch in batches for link in batch.links}
    assert {(s.trace_id, s.span_id) for s in rerank_servers} <= linked
    for batch in batches:
        assert (batch.trace_id, batch.parent_span_id) in batch.links
        assert batch.attributes["twostage.batch.size"] >= len(batch.links)
        assert batch.attributes["twostage.batch.padded_tokens"] >= batch.attributes["twostage.batch.real_tokens"]


async def test_a_degraded_answer_carries_its_code_in_its_trace(traced_stack):
    stack, receiver = traced_stack
    reply = await search(stack, "traced-degraded", LONG_QUERY)
    codes = [gateway_pb2.DegradationCode.Name(d.code) for d in reply.degradations]
    assert "QUERY_TRUNCATED" in codes
    spans = await received_trace(receiver, "traced-degraded")
    (search_span,) = [s for s in spans if s.name == "search"]
    assert "query_truncated" in search_span.attributes["twostage.degradations"]
    assert ("degraded", {"twostage.degradation": "query_truncated",
                         "twostage.detail": "rerank read the start of the query"}) in search_span.events
    assert any(s.attributes.get("twostage.query_truncated") for s in spans if s.service == "twostage-rerank")


def scrape(port: int, openmetrics: bool = False) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


async def test_the_search_latency_exemplar_opens_a_received_trace(traced_stack):
    stack, receiver = traced_stack
    await search(stack, "traced-exemplar", "statins lower cholesterol")
    await received_trace(receiver, "traced-exemplar", batches=False)
    gateway_metrics = stack.metrics_ports()[stack.gateway_target]
    text = await asyncio.to_thread(scrape, gateway_metrics, True)
    exemplars = {sample.exemplar.labels["trace_id"] for family in openmetrics_families(text)
                 for sample in family.samples
                 if sample.name == "twostage_rpc_latency_seconds_bucket" and sample.labels["method"] == "Gateway/Search"
                 and sample.exemplar is not None}
    searches = {s.trace_id for s in receiver.spans if s.name == "search"}
    assert exemplars and exemplars <= searches


def queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard and the alert rules."""
    found = []
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label): the metric, with the label asked for
            metric, label = variable["query"]["query"].removeprefix("label_values(").rstrip(")").split(", ")
            found.append((f"variable {variable['name']}", f"count by ({label}) ({metric})"))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"]))
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    for group in rules["spec"]["groups"]:
        for rule in group["rules"]:
            found.append((f"alert {rule['alert']}", rule["expr"]))
    # Grafana's variables, as Grafana fills them in.
    return [(where, expr.replace("$__rate_interval", "5m").replace("$namespace", ".*")) for where, expr in found]


def selectors_and_groupings(expr) -> tuple[list, list]:
    """Every vector selector, and every aggregation's grouping labels with the selectors it aggregates."""
    selectors, groupings = [], []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            inner = []
            promql_parser.walk(node.expr, lambda n: inner.append(n) if isinstance(n, promql_parser.VectorSelector)
                               else None)
            groupings.append((list(node.modifier.labels), inner))

    promql_parser.walk(expr, visit)
    return selectors, groupings


def problems(checked: list[tuple[str, str]], exported: dict[str, dict[str, set[str]]]) -> tuple[list[str], set]:
    """What is wrong with these queries against the samples ``exported`` (name -> label -> values), and the
    metric names they use."""
    import re

    wrong, used = [], set()
    for where, text in checked:
        try:
            expr = promql_parser.parse(text)
        except ValueError as error:
            wrong.append(f"{where}: not PromQL ({error}): {text}")
            continue
        selectors, groupings = selectors_and_groupings(expr)
        for selector in selectors:
            name = selector.name
            used.add(name)
            if name not in exported:
                wrong.append(f"{where}: {name} is not exported")
                continue
            for matcher in selector.matchers.matchers:
                values = exported[name].get(matcher.name)
                if matcher.name in TARGET_LABELS:
                    continue
                if values is None:
                    wrong.append(f"{where}: {name} has no label {matcher.name}")
                elif matcher.op == promql_parser.MatchOp.Equal and matcher.value not in values:
                    wrong.append(f"{where}: {name}{{{matcher.name}={matcher.value!r}}} never seen: {sorted(values)}")
                elif matcher.op == promql_parser.MatchOp.Re and not any(re.fullmatch(matcher.value, v) for v in values):
                    wrong.append(f"{where}: {name}{{{matcher.name}=~{matcher.value!r}}} matches nothing seen")
        for labels, inner in groupings:
            available = TARGET_LABELS.union(*(exported.get(s.name, {}) for s in inner))
            if missing := set(labels) - available:
                wrong.append(f"{where}: grouped by {sorted(missing)}, which its metrics lack")
    return wrong, used


def test_the_query_check_catches_a_wrong_name_label_or_value():
    exported = {"twostage_rpc_requests_total": {"method": {"Gateway/Search"}, "code": {"OK"}}}
    checked = [("a", 'sum by (code) (rate(twostage_rpc_requests_total{method="Gateway/Search"}[5m]))'),
               ("b", 'rate(twostage_rpc_request_total[5m])'),
               ("c", 'twostage_rpc_requests_total{method="Search"}'),
               ("d", 'sum by (tier) (twostage_rpc_requests_total{tier=~".+"})'),
               ("e", 'sum(')]
    wrong, _ = problems(checked, exported)
    assert [w.split(":")[0] for w in wrong] == ["b", "c", "d", "d", "e"], wrong


async def test_every_dashboard_and_alert_query_names_exported_metrics_with_their_labels(traced_stack):
    stack, _ = traced_stack
    await search(stack, "scraped")  # every tier has answered a search and run a batch
    exported: dict[str, dict[str, set[str]]] = {}  # sample name -> label -> values seen
    for port in stack.metrics_ports().values():
        for family in text_string_to_metric_families(await asyncio.to_thread(scrape, port)):
            for sample in family.samples:
                labels = exported.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    labels.setdefault(label, set()).add(value)
    checked = queries()
    assert len(checked) > 40
    wrong, used = problems(checked, exported)
    assert not wrong, "\n".join(wrong)
    # The operator's questions are all on the dashboard or in the alerts.
    for metric in ("twostage_gateway_degraded_total", "twostage_batch_padded_tokens_total",
                   "twostage_batch_queue_wait_seconds_bucket", "twostage_rerank_cache_hits_total",
                   "twostage_batch_compute_seconds_sum", "twostage_recall_documents",
                   "twostage_gateway_replica_ejections_total", "twostage_gateway_membership_changes_total",
                   "twostage_gateway_replica_unavailable_seconds", "twostage_replica_agreement_age_seconds",
                   "twostage_recall_volume_free_bytes", "twostage_serving"):
        assert metric in used, metric


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Prometheus)")
def test_promtool_accepts_the_rules(tmp_path):
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    checked = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True,
                             text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_log_lines_written_inside_a_span_name_its_trace(capsys):
    from twostage.logs import TraceIds, _TextFormatter

    logger = logging.getLogger("tests.traced")
    handler = logging.StreamHandler()
    handler.setFormatter(_TextFormatter("%(levelname)s %(message)s"))
    handler.addFilter(TraceIds())
    logger.addHandler(handler)
    try:
        logger.warning("outside")
        span = TracerProvider().get_tracer("test").start_span("request")  # a provider of its own: nothing global
        with trace.use_span(span, end_on_exit=True):
            logger.warning("inside")
        context = span.get_span_context()
    finally:
        logger.removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    ids = f"trace_id={trace.format_trace_id(context.trace_id)} span_id={trace.format_span_id(context.span_id)}"
    assert lines == ["WARNING outside", f"WARNING inside [{ids}]"]


def test_tracing_is_off_unless_configured_and_reads_http_headers_too():
    assert not tracing.configured({})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"})
    assert tracing.configured({"OTEL_TRACES_EXPORTER": "console"})
    assert tracing.outgoing((("authorization", "Bearer x"),)) == (("authorization", "Bearer x"),)  # off here
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for headers in ({"Traceparent": parent}, [("traceparent", parent), ("x-bin", b"\x00")]):
        context = trace.get_current_span(tracing.extract(headers)).get_span_context()
        assert (trace.format_trace_id(context.trace_id), context.is_remote) == ("0af7651916cd43dd8448eb211c80319c",
                                                                                True)
