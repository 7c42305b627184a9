"""What an operator sees: the traces of real searches across the three processes (received by an OTLP
receiver inside the test), exemplars that lead from a latency bucket to a trace, log lines that name their
trace, and a dashboard and alerts whose every query names metrics and labels the servers really export."""

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import promql_parser
import pytest
import yaml
from opentelemetry import trace
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from tests.system.test_cli import free_port_run
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


async def search(stack: Stack, request_id: str, query: str = "homocysteine and vitamin B12", metadata=(),
                 **fields):
    async with grpc.aio.insecure_channel(stack.gateway_target) as channel:
        return await gateway_pb2_grpc.GatewayStub(channel).Search(gateway_pb2.SearchRequest(
            query=query, request_id=request_id, recall_k=8, top_k=3, budget_ms=60_000, **fields), metadata=metadata)


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

    # Each model batch links to every request it served, and lives in the trace of one of them: every link names
    # a span received from a rerank server (this search's or another's), each request once.
    served = {(s.trace_id, s.span_id) for s in receiver.spans if s.service == "twostage-rerank" and s.kind == SERVER}
    batches = [s for s in receiver.spans if s.name == "model batch" and s.attributes["twostage.batcher"] == "rerank"
               and {span_id for _, span_id in s.links} & {r.span_id for r in rerank_servers}]
    linked = {link for batch in batches for link in batch.links}
    assert {(s.trace_id, s.span_id) for s in rerank_servers} <= linked <= served
    for batch in batches:
        assert (batch.trace_id, batch.parent_span_id) in batch.links and batch.service == "twostage-rerank"
        assert len(set(batch.links)) == len(batch.links) == batch.attributes["twostage.batch.traced"]
        assert batch.attributes["twostage.batch.size"] >= len(batch.links)
        assert batch.attributes["twostage.batch.padded_tokens"] >= batch.attributes["twostage.batch.real_tokens"]
    # Recall's query embedding: its batch links to the recall server's "embed" span.
    (embed,) = [s for s in spans if s.name == "embed" and s.service == "twostage-recall"]
    assert any((embed.trace_id, embed.span_id) in s.links for s in receiver.spans if s.name == "model batch")
    # What the caller asked is in no span: counts, times and codes only.
    assert not [s.name for s in spans if "homocysteine" in repr((s.attributes, s.events))]


SEARCH_CALLS = ("twostage.v1.Recall/Search", "twostage.v1.Rerank/Rerank")


def stage_roots(spans) -> set[str]:
    """Traces recall or rerank started on their own for a search's calls: such server spans with no parent (the
    gateway's own Info calls, made outside any request, are left out)."""
    return {s.span_id for s in spans if s.name in SEARCH_CALLS and s.kind == SERVER and not s.parent_span_id}


async def test_a_search_its_caller_did_not_sample_starts_no_trace_at_any_tier(traced_stack):
    """Every tier here samples every request that enters it untraced (parent-based, always on). A search whose
    caller sent a traceparent with flags 00 is not sampled at the gateway, and recall and rerank, told so in
    their requests, start no trace of their own for it."""
    stack, receiver = traced_stack
    await search(stack, "before-declined")
    await received_trace(receiver, "before-declined", batches=False)
    before = stage_roots(receiver.spans)
    declined = f"00-{'ab' * 16}-{'cd' * 8}-00"
    reply = await search(stack, "declined", "vitamin B12 and homocysteine", (("traceparent", declined),))
    assert reply.reranked > 0
    # Each process exports its spans in the order they end: once a later search's spans have arrived from every
    # tier, whatever the declined one made has too.
    await search(stack, "after-declined")
    after = await received_trace(receiver, "after-declined", batches=False)
    assert {s.service for s in after} == {"twostage-gateway", "twostage-recall", "twostage-rerank"}
    assert not [s for s in receiver.spans if s.trace_id == "ab" * 16]
    assert stage_roots(receiver.spans) == before


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


async def test_the_gateways_rerank_and_embed_rpcs_are_traced_like_its_search(traced_stack):
    stack, receiver = traced_stack
    async with grpc.aio.insecure_channel(stack.gateway_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        ranked = await stub.Rerank(gateway_pb2.RerankTextsRequest(
            query="vitamin B12 deficiency", documents=["B12 and anaemia", "a lemon cake"], request_id="traced-rerank"))
        await stub.Embed(gateway_pb2.EmbedTextsRequest(texts=["first text", "second"], request_id="traced-embed"))
    assert len(ranked.results) == 2

    def trace_named(spans, name: str, request_id: str) -> list:
        trace_id = next((s.trace_id for s in spans if s.name == name
                         and s.attributes.get("twostage.request_id") == request_id), None)
        return [s for s in spans if s.trace_id == trace_id] if trace_id else []

    def complete(spans) -> bool:  # each process exports on its own: both roots, and a server span per call
        for name, request_id, call in (("rerank texts", "traced-rerank", "twostage.v1.Rerank/Rerank"),
                                       ("embed texts", "traced-embed", "twostage.v1.Recall/Embed")):
            mine = trace_named(spans, name, request_id)
            calls = [s for s in mine if s.name == call]
            if (not any(not s.parent_span_id for s in mine) or not calls
                    or sum(s.kind == SERVER for s in calls) != sum(s.kind == CLIENT for s in calls)):
                return False
        return True

    spans = await asyncio.to_thread(receiver.wait_for, complete)
    for name, request_id, rpc, tier, call in (
            ("rerank texts", "traced-rerank", "twostage.v1.Gateway/Rerank", "twostage-rerank",
             "twostage.v1.Rerank/Rerank"),
            ("embed texts", "traced-embed", "twostage.v1.Gateway/Embed", "twostage-recall", "twostage.v1.Recall/Embed")):
        mine = trace_named(spans, name, request_id)
        by_id = {s.span_id: s for s in mine}
        (root,) = [s for s in mine if not s.parent_span_id]
        (work,) = [s for s in mine if s.name == name]
        assert (root.service, root.kind, root.name) == ("twostage-gateway", SERVER, rpc)
        assert by_id[work.parent_span_id] is root and not work.error
        servers = [s for s in mine if s.service == tier and s.kind == SERVER]
        assert servers
        for server in servers:  # each call the tier served: a client span of the gateway's, under its work span
            client = by_id[server.parent_span_id]
            assert (client.kind, client.name, server.name) == (CLIENT, call, call)
            ancestor = client
            while ancestor.parent_span_id and ancestor is not work:
                ancestor = by_id[ancestor.parent_span_id]
            assert ancestor is work, f"{call} is not under {name}"
    (rerank_work,) = [s for s in trace_named(spans, "rerank texts", "traced-rerank") if s.name == "rerank texts"]
    assert (rerank_work.attributes["twostage.documents"], rerank_work.attributes["twostage.scored"]) == (2, 2)
    assert 0 < rerank_work.attributes["twostage.budget_used"] < 1
    (embed_work,) = [s for s in trace_named(spans, "embed texts", "traced-embed") if s.name == "embed texts"]
    assert (embed_work.attributes["twostage.texts"], embed_work.attributes["twostage.dims"]) == (2, 384)


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


def templates() -> list[tuple[str, str, set[str]]]:
    """(where, PromQL, the labels its legend or its alert's labels and annotations name): each must be on every
    series the query returns, or Grafana and Alertmanager print nothing in its place."""
    found = []
    for panel in json.loads((MONITORING / "dashboard.json").read_text())["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r}", target["expr"],
                          set(re.findall(r"{{\s*(\w+)\s*}}", target.get("legendFormat", "")))))
    for group in yaml.safe_load((MONITORING / "rules.yaml").read_text())["spec"]["groups"]:
        for rule in group["rules"]:
            text = json.dumps([rule.get("labels", {}), rule.get("annotations", {})])
            text = re.sub(r"{{ with \$labels\.\w+ }}", "", text)  # optional: printed only when present
            found.append((f"alert {rule['alert']}", rule["expr"], set(re.findall(r"\$labels\.(\w+)", text))))
    return [(where, expr.replace("$__rate_interval", "5m").replace("$namespace", ".*"), labels)
            for where, expr, labels in found]


def scalar(node) -> bool:
    P = promql_parser
    if isinstance(node, P.NumberLiteral):
        return True
    if isinstance(node, (P.ParenExpr, P.UnaryExpr)):
        return scalar(node.expr)
    if isinstance(node, P.BinaryExpr):
        return scalar(node.lhs) and scalar(node.rhs)
    return isinstance(node, P.Call) and node.func.name in ("scalar", "time")


def output_labels(node, exported: dict[str, dict[str, set[str]]]) -> set[str]:
    """The labels every series of an expression's result carries, by PromQL's rules: an aggregation keeps its
    ``by`` labels, ``absent`` only its selector's equality matchers, ``or`` what both sides have, a one-to-one
    match ``on`` its labels; a selector has its metric's labels and the scrape's."""
    P = promql_parser
    if isinstance(node, P.VectorSelector):
        return set(exported.get(node.name, {})) | TARGET_LABELS
    if isinstance(node, P.MatrixSelector):
        return output_labels(node.vector_selector, exported)
    if isinstance(node, (P.ParenExpr, P.UnaryExpr, P.SubqueryExpr)):
        return output_labels(node.expr, exported)
    if isinstance(node, (P.NumberLiteral, P.StringLiteral)):
        return set()
    if isinstance(node, P.AggregateExpr):
        if node.modifier is None:
            return set()
        labels = set(node.modifier.labels)
        return labels if node.modifier.type == P.AggModifierType.By else output_labels(node.expr, exported) - labels
    if isinstance(node, P.Call):
        name, args = node.func.name, list(node.args)
        if name in ("absent", "absent_over_time"):
            selector = args[0].vector_selector if isinstance(args[0], P.MatrixSelector) else args[0]
            if not isinstance(selector, P.VectorSelector):
                return set()
            return {m.name for m in selector.matchers.matchers if m.op == P.MatchOp.Equal}
        vectors = [a for a in args if not scalar(a) and not isinstance(a, P.StringLiteral)]
        if not vectors:
            return set()
        labels = output_labels(vectors[-1] if name == "histogram_quantile" else vectors[0], exported)
        return labels - {"le"} if name == "histogram_quantile" else labels
    if isinstance(node, P.BinaryExpr):
        if scalar(node.rhs):
            return output_labels(node.lhs, exported)
        if scalar(node.lhs):
            return output_labels(node.rhs, exported)
        left, right = output_labels(node.lhs, exported), output_labels(node.rhs, exported)
        op, modifier = str(node.op), node.modifier
        if op == "or":
            return left & right
        matching = modifier.matching if modifier is not None else None
        if op in ("and", "unless") or matching is None:
            return left
        named = set(matching.labels)
        if modifier.card == P.VectorMatchCardinality.OneToOne:
            return named if matching.type == P.LabelModifierType.Include else left - named
        grouped = set(modifier.group_labels or ())
        return (left if modifier.card == P.VectorMatchCardinality.ManyToOne else right) | grouped
    raise AssertionError(f"no rule for {type(node).__name__}")


def template_problems(checked: list[tuple[str, str, set[str]]], exported) -> list[str]:
    wrong = []
    for where, text, named in checked:
        expr = promql_parser.parse(text)
        if missing := named - output_labels(expr, exported):
            wrong.append(f"{where}: names {sorted(missing)}, which its query's result does not carry")
    return wrong


# Labels whose every value is known: a matcher (even a negative one) must name real values.
DOMAINS = {"code": {code.name for code in grpc.StatusCode}, "protocol": {"grpc", "http"},
           "tier": {"gateway", "recall", "rerank"}, "batcher": {"embed", "rerank"}}


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
                elif matcher.name in DOMAINS:  # every alternative a real value, whatever the matcher's sense
                    if matcher.op in (promql_parser.MatchOp.Re, promql_parser.MatchOp.NotRe):
                        alternatives = matcher.value.split("|") if re.fullmatch(r"[\w|]+", matcher.value) else []
                    else:
                        alternatives = [matcher.value]
                    if unknown := [a for a in alternatives if a not in DOMAINS[matcher.name]]:
                        wrong.append(f"{where}: {name}{{{matcher.name}}}: no such value {unknown}")
                elif matcher.op == promql_parser.MatchOp.Equal and matcher.value not in values:
                    wrong.append(f"{where}: {name}{{{matcher.name}={matcher.value!r}}} never seen: {sorted(values)}")
                elif matcher.op == promql_parser.MatchOp.Re and not any(re.fullmatch(matcher.value, v) for v in values):
                    wrong.append(f"{where}: {name}{{{matcher.name}=~{matcher.value!r}}} matches nothing seen")
        for labels, inner in groupings:
            available = TARGET_LABELS.union(*(exported.get(s.name, {}) for s in inner))
            if missing := set(labels) - available:
                wrong.append(f"{where}: grouped by {sorted(missing)}, which its metrics lack")

        def matched_on(node, where=where):  # a binary operation "on (labels)": both sides must carry them
            if not isinstance(node, promql_parser.BinaryExpr) or node.modifier is None:
                return
            matching = node.modifier.matching
            if matching is not None and matching.type == promql_parser.LabelModifierType.Include:
                for side in (node.lhs, node.rhs):
                    if missing := set(matching.labels) - output_labels(side, exported):
                        wrong.append(f"{where}: matched on {sorted(missing)}, which one side lacks")

        promql_parser.walk(expr, matched_on)
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
    # A value a label never takes, in a negative matcher too (the error budget would count every other code).
    wrong, _ = problems([("f", 'rate(twostage_rpc_requests_total{code!~"OK|INVALID_ARGUMNET"}[5m])'),
                         ("g", 'a / on (tier) twostage_rpc_requests_total')], {**exported, "a": {"tier": {"x"}}})
    assert [w.split(":")[0] for w in wrong] == ["f", "g"], wrong
    # A template naming a label its query drops: absent() of a comparison has no labels at all; "or" keeps only
    # what both sides carry; an aggregation only its "by" labels.
    serving = {"twostage_serving": {"tier": {"gateway"}}}
    checked_templates = [
        ("h", 'absent(twostage_serving{tier="gateway"} == 1)', {"tier"}),
        ("i", 'absent(twostage_serving{tier="gateway"})', {"tier"}),
        ("j", 'max by (namespace, tier) (twostage_serving) < 1 or absent(twostage_serving{tier="x"})', {"namespace"}),
        ("k", 'sum by (tier) (twostage_serving) / ignoring (pod) count by (tier) (twostage_serving)', {"tier"}),
        ("l", 'sum(twostage_serving)', {"pod"}),
    ]
    assert [w.split(":")[0] for w in template_problems(checked_templates, serving)] == ["h", "j", "l"]


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
    wrong += template_problems(templates(), exported)
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


def requests(namespace: str, code: str, per_minute: int) -> dict:
    return {"series": f'twostage_rpc_requests_total{{namespace="{namespace}",method="Gateway/Search",code="{code}",'
                      f'protocol="grpc"}}', "values": f"0+{per_minute}x130"}


def latency(namespace: str, within_1s: int, of: int) -> list[dict]:
    labels = f'namespace="{namespace}",method="Gateway/Search",protocol="grpc"'
    return [{"series": f'twostage_rpc_latency_seconds_bucket{{{labels},le="1.0"}}', "values": f"0+{within_1s}x130"},
            {"series": f'twostage_rpc_latency_seconds_count{{{labels}}}', "values": f"0+{of}x130"}]


def serving(namespace: str, tier: str, pod: str, values: str) -> dict:
    return {"series": f'twostage_serving{{namespace="{namespace}",tier="{tier}",pod="{pod}"}}', "values": values}


def rendered(text: str, labels: dict) -> str:
    """An annotation as Alertmanager shows it, for the template forms rules.yaml uses (a label it names that the
    alert lacks is a KeyError here, where Go would print "<no value>")."""
    text = re.sub(r"{{ with \$labels\.(\w+) }}(.*?){{ \. }}{{ end }}",
                  lambda m: m.group(2) + labels[m.group(1)] if labels.get(m.group(1)) else "", text)
    return re.sub(r"{{ \$labels\.(\w+) }}", lambda m: labels[m.group(1)], text)


def alerts(eval_time: str, name: str, *labels: dict) -> dict:
    """What promtool should find firing for alert ``name`` at ``eval_time``: these labels, the rule's own
    annotations rendered with them."""
    (rule,) = [r for g in yaml.safe_load((MONITORING / "rules.yaml").read_text())["spec"]["groups"]
               for r in g["rules"] if r["alert"] == name]
    return {"eval_time": eval_time, "alertname": name, "exp_alerts": [
        {"exp_labels": found, "exp_annotations": {key: rendered(text, found)
                                                  for key, text in rule["annotations"].items()}}
        for found in labels]}


ALERT_TESTS = [
    {  # 5% of namespace a's searches fail; b's callers send bad requests (not the service's errors); c is idle
        "interval": "1m",
        "input_series": [requests("a", "OK", 950), requests("a", "UNAVAILABLE", 50), requests("b", "OK", 950),
                         requests("b", "INVALID_ARGUMENT", 50), requests("c", "OK", 0)],
        "alert_rule_test": [
            alerts("70m", "TwostageSearchErrorBudgetBurn", {"severity": "page", "namespace": "a"}),
            alerts("70m", "TwostageSearchErrorBudgetBurnSlow", {"severity": "ticket", "namespace": "a"}),
            alerts("1m", "TwostageSearchErrorBudgetBurn"),  # not yet for 2 minutes
        ],
    },
    {  # a: 20% of searches over 1 s (page and ticket); b: 10% (ticket only); c: no searches at all (no alert)
        "interval": "1m",
        "input_series": [*latency("a", 80, 100), *latency("b", 90, 100), *latency("c", 0, 0)],
        "alert_rule_test": [
            alerts("70m", "TwostageSearchLatencyBudgetBurn", {"severity": "page", "namespace": "a"}),
            alerts("70m", "TwostageSearchLatencyBudgetBurnSlow", {"severity": "ticket", "namespace": "a"},
                   {"severity": "ticket", "namespace": "b"}),
        ],
    },
    {  # a: both rerank replicas NOT_SERVING; b: its only rerank replica gone after 5 minutes; c: all serving
        "interval": "1m",
        "input_series": [
            *(serving(ns, tier, f"{tier}-0", "1x40") for ns in "abc" for tier in ("gateway", "recall")),
            serving("a", "rerank", "rerank-0", "0x40"), serving("a", "rerank", "rerank-1", "1 1 0x40"),
            serving("b", "rerank", "rerank-0", "1x5 stale"), serving("c", "rerank", "rerank-0", "1x40"),
            {"series": 'twostage_gateway_replica_unavailable_seconds{namespace="a",pod="gateway-0",tier="rerank",'
                       'replica="10.0.0.7:50053"}', "values": "0+60x40"},
            {"series": 'twostage_gateway_replica_unavailable_seconds{namespace="a",pod="gateway-0",tier="rerank",'
                       'replica="10.0.0.8:50053"}', "values": "0x40"},
        ],
        "alert_rule_test": [
            alerts("20m", "TwostageTierNotServing", {"severity": "page", "namespace": "a", "tier": "rerank"},
                   {"severity": "page", "namespace": "b", "tier": "rerank"}),
            alerts("20m", "TwostageRerankReplicaEjected", {
                "severity": "ticket", "namespace": "a", "pod": "gateway-0", "tier": "rerank",
                "replica": "10.0.0.7:50053"}),
            alerts("8m", "TwostageRerankReplicaEjected"),  # 480 s out: not yet
        ],
    },
    {  # no tier exports anything anywhere
        "interval": "1m",
        "input_series": [requests("a", "OK", 1)],
        "alert_rule_test": [alerts("10m", "TwostageTierNotServing", *({"severity": "page", "tier": tier}
                                                                      for tier in ("gateway", "recall", "rerank")))],
    },
]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Prometheus)")
def test_the_alerts_fire_on_the_failures_they_name_and_not_on_callers_mistakes_or_idleness(tmp_path):
    assert rendered("{{ $labels.tier }} is down{{ with $labels.namespace }} in {{ . }}{{ end }}.",
                    {"tier": "rerank", "namespace": "a"}) == "rerank is down in a."
    rules = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rules["spec"]["groups"]}))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": ALERT_TESTS}))
    checked = subprocess.run(["promtool", "test", "rules", "tests.yaml"], cwd=tmp_path, capture_output=True,
                             text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


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
