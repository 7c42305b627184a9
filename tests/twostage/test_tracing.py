"""Tracing inside one process, spans kept in memory: the sampling decision taken once where a request enters
and followed by every tier behind it, nothing made for an unsampled request, contexts that never outlive
their request (exceptions, cancellation, background work), batch links, what spans may carry, exemplars
and log lines only for sampled requests, the HTTP face's traceparent, and set-up that refuses what it
cannot honour."""

import asyncio
import logging
import re
import subprocess
import sys
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_text
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from twostage import errors, tracing
from twostage.batching import BatchPolicy, DynamicBatcher
from twostage.bench import trace_path
from twostage.errors import ConfigError
from twostage.metrics import observe_rpc

CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
SAMPLED = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
NOT_SAMPLED = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"
SERVER, CLIENT = trace.SpanKind.SERVER, trace.SpanKind.CLIENT


@pytest.fixture
def traced():
    """``traced(sampler, ratio)`` turns tracing on in this process, spans kept in memory (the exporter it
    returns); off again after the test."""

    def start(sampler: str = "parentbased_always_on", ratio: float | None = None) -> InMemorySpanExporter:
        exporter = InMemorySpanExporter()
        environ = {"OTEL_TRACES_SAMPLER": sampler}
        if ratio is not None:
            environ["OTEL_TRACES_SAMPLER_ARG"] = str(ratio)
        assert tracing.setup("test", environ, exporter=exporter)
        return exporter

    yield start
    tracing.shutdown(1)
    assert not tracing.enabled


def traceparents(received) -> list[str]:
    return [dict(metadata)["traceparent"] for _, metadata, _ in received]


def hex_id(value: int, width: int) -> str:
    return f"{value:0{width}x}"


# --- One decision per request, where it enters --------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["parentbased_traceidratio", "parentbased_always_on"])
async def test_an_unsampled_search_makes_no_span_and_tells_every_tier_in_its_request(traced, sampler):
    """At ratio 0 no request entering untraced is sampled; under always-on every one is, so a tier that did not
    read the field would make spans of its own."""
    exporter = traced(sampler, 0.0 if sampler.endswith("ratio") else None)
    received = []
    search, close = await trace_path._stack(received)
    try:
        if sampler.endswith("ratio"):
            result = await search("first")
            assert result.reranked == trace_path.CANDIDATES
            await search("second")
        # A caller that decided not to sample: the tiers are told the same.
        await search("third", (("traceparent", NOT_SAMPLED),))
    finally:
        await close()
    assert exporter.get_finished_spans() == ()
    calls = 3 if sampler.endswith("ratio") else 1
    assert [method.rsplit("/", 1)[-1] for method, _, _ in received] == ["Search", "Rerank"] * calls
    # Told in the request message (trace_unsampled), with no traceparent header on the call.
    assert all(declined and "traceparent" not in dict(metadata) for _, metadata, declined in received)
    assert tracing._REQUEST.get() is None  # nothing left behind in the caller's context


def test_a_tier_told_in_the_request_that_its_caller_did_not_sample_starts_no_trace(traced):
    """Where every request entering untraced is sampled (parent-based, always on), one whose request says its
    caller declined it gets no span, and nothing under it does, whatever traceparent comes with it; a call it
    makes still tells the next tier, with a fresh traceparent of flags 00."""
    exporter = traced()
    for headers in ((), (("traceparent", SAMPLED),), (("traceparent", "00-not-a-traceparent"),)):
        with tracing.server_span("twostage.v1.Recall/Search", headers, declined_by_caller=True) as span:
            assert not span.is_recording() and not tracing.sampled() and tracing.declined()
            with tracing.span("embed") as step:
                assert not step.is_recording()
            (token, carried) = tracing.outgoing((("authorization", "Bearer x"),))
            assert token == ("authorization", "Bearer x") and carried[0] == "traceparent"
            assert tracing.unsampled(carried[1]) and re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", carried[1])
        assert not tracing.declined()
    with tracing.server_span("twostage.v1.Recall/Search", ()) as span:  # the same request, not declined
        assert span.is_recording() and not tracing.declined()
    assert [s.name for s in exporter.get_finished_spans()] == ["twostage.v1.Recall/Search"]


async def test_calls_outside_a_search_tell_the_next_tier_by_a_traceparent_and_a_message_never_keeps_a_decision(
        traced):
    """Info has no field: an unsampled request's call carries its traceparent (flags 00). A search's message
    sent again under another decision says the new one."""
    from gateway.clients import RecallClient
    from twostage.v1 import common_pb2, recall_pb2

    traced("parentbased_traceidratio", 0.0)
    sent = []

    class Recording(RecallClient):
        async def _send(self, method, request, timeout_s, metadata):
            sent.append((method, dict(metadata), getattr(request, "trace_unsampled", None)))

    client = Recording("127.0.0.1:1", "recall shard 0")
    message = recall_pb2.RecallSearchRequest(query="q", k=4)
    try:
        with tracing.server_span("twostage.v1.Gateway/Search", (("traceparent", NOT_SAMPLED),)):
            await client._call("Info", common_pb2.InfoRequest(), 1.0)
            await client._call("Search", message, 1.0)
        await client._call("Search", message, 1.0)  # outside any request
    finally:
        await client.close()
    assert sent == [("Info", {"traceparent": NOT_SAMPLED}, None), ("Search", {}, True), ("Search", {}, False)]


def test_every_call_declined_in_its_request_has_the_field():
    """``DECLINED_IN_REQUEST`` names methods whose request message has ``trace_unsampled``: a name without the
    field would fail every such call."""
    from twostage.v1 import recall_pb2, rerank_pb2

    services = {service.full_name: service for module in (recall_pb2, rerank_pb2)
                for service in module.DESCRIPTOR.services_by_name.values()}
    for call in tracing.DECLINED_IN_REQUEST:
        service, method = call.rsplit("/", 1)
        assert "trace_unsampled" in services[service].methods_by_name[method].input_type.fields_by_name, call


async def test_the_field_decides_over_a_sampled_header_at_a_tiers_interceptor(traced):
    """Through the interceptor a stage runs: a Rerank whose request declines it makes no span even with a sampled
    traceparent and a sampler that samples everything; the same call without the field is traced."""
    from twostage.v1 import rerank_pb2

    exporter = traced()
    recorded = []

    async def rerank(request, context):
        recorded.append(tracing.sampled())
        return rerank_pb2.RerankResponse()

    for declined in (True, False):
        await trace_path._intercepted(trace_path._interceptors(), "/twostage.v1.Rerank/Rerank",
                                      (("traceparent", SAMPLED),), rerank,
                                      rerank_pb2.RerankRequest(query="q", documents=["d"], trace_unsampled=declined))
    assert recorded == [False, True]
    assert [s.name for s in exporter.get_finished_spans()] == ["twostage.v1.Rerank/Rerank"]


def test_a_request_entering_here_gets_a_w3c_traceparent_with_the_id_the_sampler_judged(traced):
    """Where a request enters, its trace id is drawn once and the sampler asked about it: a sampled request's
    span has that id, and an unsampled one carries it on (with its own span id, flags 00) in a well-formed
    traceparent, so that the tiers behind follow the same decision."""
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    traced("parentbased_traceidratio", 0.5)
    bound = TraceIdRatioBased.get_bound_for_rate(0.5)
    carried, sampled_ids = [], []
    for _ in range(400):
        with tracing.server_span("root", ()) as span:
            if span.is_recording():
                sampled_ids.append(span.get_span_context().trace_id)
                assert not tracing.unsampled(dict(tracing.outgoing(()))["traceparent"])
            else:
                carried.append(dict(tracing.outgoing((("authorization", "Bearer x"),)))["traceparent"])
    assert 100 < len(carried) < 300 and len(carried) + len(sampled_ids) == 400
    assert all(trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound for trace_id in sampled_ids)
    for traceparent in carried:
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", traceparent), traceparent
        trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
        assert trace_id and span_id  # neither all zeros
        assert trace_id & TraceIdRatioBased.TRACE_ID_LIMIT >= bound  # the id the sampler refused
    assert len(set(carried)) == len(carried)


async def test_a_sampled_search_is_one_trace_across_the_tiers_with_batches_linked(traced):
    exporter = traced()  # parent-based, always on
    received = []
    search, close = await trace_path._stack(received)
    try:
        await search("traced")
        await search("child of the caller's", (("traceparent", SAMPLED),))
    finally:
        await close()
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}
    roots = [s for s in spans if s.name == "twostage.v1.Gateway/Search"]
    assert len(roots) == 2 and all(r.kind == SERVER for r in roots)
    own, child = roots
    assert own.parent is None
    assert (hex_id(child.context.trace_id, 32), hex_id(child.parent.span_id, 16)) == (CALLER_TRACE, CALLER_SPAN)

    def parent(span_):
        return by_id.get(span_.parent.span_id) if span_.parent else None

    for root in roots:
        mine = [s for s in spans if s.context.trace_id == root.context.trace_id]
        names = {s.name for s in mine}
        assert {"search", "recall", "rerank", "rerank round", "twostage.v1.Recall/Search", "twostage.v1.Rerank/Rerank",
                "embed", "dense search", "lexical search", "fusion", "tokenize", "queue wait"} <= names
        servers = {s.name: s for s in mine if s.kind == SERVER and s is not root}
        for name, server in servers.items():  # each tier's server span is the child of the gateway's client span
            client = parent(server)
            assert (client.kind, client.name) == (CLIENT, name)
            assert parent(client).name in ("recall", "rerank round")
        # Every batch that served this request links to the span that waited for it (recall's "embed", rerank's
        # server span), and is that span's child.
        batches = [s for s in spans if s.name == "model batch"
                   and any(link.context.trace_id == root.context.trace_id for link in s.links)]
        assert sorted(s.attributes["twostage.batcher"] for s in batches) == ["embed", "rerank"]
        waited = {"embed": next(s for s in mine if s.name == "embed"), "rerank": servers["twostage.v1.Rerank/Rerank"]}
        assert parent(waited["embed"]) is servers["twostage.v1.Recall/Search"]
        for batch in batches:
            (link,) = batch.links
            assert link.context.span_id == waited[batch.attributes["twostage.batcher"]].context.span_id
            assert batch.parent.span_id == link.context.span_id and batch.attributes["twostage.batch.traced"] == 1
    # The tiers were told the caller's trace (sampled) and the span that called them, and nothing says otherwise.
    assert not any(declined for *_, declined in received)
    sent = traceparents(received)
    assert all(not tracing.unsampled(t) for t in sent)
    assert {t.split("-")[1] for t in sent[2:]} == {CALLER_TRACE}
    assert {t.split("-")[2] for t in sent} == {hex_id(s.context.span_id, 16) for s in spans if s.kind == CLIENT}


async def test_the_root_decision_follows_the_ratio_and_the_sdk_agrees_with_it(traced):
    exporter = traced("parentbased_traceidratio", 0.25)
    search, close = await trace_path._stack()
    try:
        for i in range(200):
            await search(f"query {i}")
    finally:
        await close()
    roots = [s for s in exporter.get_finished_spans() if s.name == "twostage.v1.Gateway/Search"]
    assert 25 <= len(roots) <= 80  # 50 expected
    bound = round(0.25 * 2**64)
    assert all(s.context.trace_id & (2**64 - 1) < bound for s in roots)  # the ids the decision was taken on


# --- Contexts end with their request ------------------------------------------------------------------------

async def test_spans_end_and_contexts_are_restored_on_errors_and_cancellation_without_quoting_messages(traced):
    exporter = traced()
    secret = "patient-4711 private filter value"
    with pytest.raises(errors.InvalidArgument), tracing.server_span("request", ()), tracing.span("inner"):
        raise errors.InvalidArgument(f"filter: compare with a string, got {secret!r}")
    assert tracing._REQUEST.get() is None and not trace.get_current_span().get_span_context().is_valid

    started, release = asyncio.Event(), asyncio.Event()

    async def request():
        with tracing.server_span("cancelled request", ()), tracing.span("waiting"):
            started.set()
            await release.wait()

    task = asyncio.create_task(request())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tracing._REQUEST.get() is None and not trace.get_current_span().get_span_context().is_valid
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"request", "inner", "cancelled request", "waiting"}  # all of them ended
    for name, kind in (("inner", "InvalidArgument"), ("request", "InvalidArgument"),
                       ("waiting", "CancelledError"), ("cancelled request", "CancelledError")):
        assert spans[name].status.status_code is StatusCode.ERROR and spans[name].status.description == kind
        assert spans[name].attributes["error.type"] == kind and not spans[name].events
    assert secret not in repr([(s.attributes, s.events, s.status.description) for s in spans.values()])


async def test_a_failed_rpc_span_says_its_code_and_not_its_details(traced):
    import grpc

    from twostage.metrics import RpcMetricsInterceptor

    exporter = traced()

    class Context(trace_path._Context):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

        def details(self):
            return "filter: got 'a private value'"

    async def refuse(request, context):
        raise errors.InvalidArgument("filter: got 'a private value'")

    interceptor = RpcMetricsInterceptor(traced=True)
    handler = await interceptor.intercept_service(
        lambda details: asyncio.sleep(0, grpc.unary_unary_rpc_method_handler(refuse)),
        trace_path._Details("/twostage.v1.Gateway/Search", (("traceparent", SAMPLED),)))
    with pytest.raises(errors.InvalidArgument):
        await handler.unary_unary(None, Context())
    (span_,) = exporter.get_finished_spans()
    assert span_.status.description == "INVALID_ARGUMENT" and span_.attributes["rpc.grpc.status_code"] == 3
    assert "private" not in repr((span_.attributes, span_.events))


async def test_background_work_a_request_sets_off_is_not_in_its_trace(traced):
    from recall_server.service import RecallService

    traced()
    seen = []

    async def refit():
        seen.append((tracing.current_context(), trace.get_current_span().get_span_context().is_valid,
                     tracing.sampled()))

    service = RecallService.__new__(RecallService)  # only its refit scheduling
    service._fitting, service._refit_after = None, False
    service.refit_calibration = refit
    with tracing.server_span("twostage.v1.Recall/Upsert", (("traceparent", SAMPLED),)):
        assert tracing.current_context() is not None
        service._refit_soon()
    await service._fitting
    assert seen == [(None, False, False)]


async def test_a_batch_links_to_each_sampled_request_it_served_and_to_no_other(traced):
    exporter = traced()
    requests = 3 + tracing.MAX_LINKS
    # One batch for all of them, formed once the last item arrives (request 0 sends two items).
    batcher = DynamicBatcher("test", lambda items: items, BatchPolicy(max_batch_size=requests + 1,
                                                                      max_batch_tokens=10**6, max_wait_ms=60_000))
    batcher.start()
    ready = asyncio.Event()
    waiting = 0

    async def one(i: int):
        nonlocal waiting
        headers = (("traceparent", NOT_SAMPLED),) if i == 1 else ()  # request 1: its caller did not sample it
        with tracing.server_span(f"request {i}", headers) as span_:
            waiting += 1
            if waiting == requests:
                ready.set()
            await ready.wait()
            await batcher.submit([i, i] if i == 0 else [i], [1, 1] if i == 0 else [1])
            return span_.get_span_context()

    try:
        contexts = await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        await batcher.close()
    (batch,) = [s for s in exporter.get_finished_spans() if s.name == "model batch"]
    sampled = [c for i, c in enumerate(contexts) if i != 1]
    assert not contexts[1].is_valid  # no span for the unsampled request
    assert batch.attributes["twostage.batch.traced"] == requests - 1  # each request once, though it sent two items
    assert len(batch.links) == tracing.MAX_LINKS
    linked = {(link.context.trace_id, link.context.span_id) for link in batch.links}
    assert linked < {(c.trace_id, c.span_id) for c in sampled}
    assert (batch.context.trace_id, batch.parent.span_id) in linked


# --- Exemplars and log lines: only for sampled requests -------------------------------------------------------

def exemplar_of(method: str) -> dict | None:
    for family in text_string_to_metric_families(openmetrics_text(REGISTRY).decode()):
        for sample in family.samples:
            if (sample.name == "twostage_rpc_latency_seconds_bucket" and sample.labels.get("method") == method
                    and sample.exemplar is not None):
                return sample.exemplar.labels
    return None


def test_exemplars_and_log_lines_name_sampled_traces_only(traced, capsys):
    from twostage.logs import TraceIds, _TextFormatter

    traced("parentbased_always_off")  # untraced arrivals are not sampled; a caller's sampled trace is
    logger = logging.getLogger("tests.traced")
    import io

    written = io.StringIO()  # this handler's lines only (other tests may have set up logging to stderr)
    handler = logging.StreamHandler(written)
    handler.setFormatter(_TextFormatter("%(levelname)s %(message)s"))
    handler.addFilter(TraceIds())
    logger.addHandler(handler)
    try:
        logger.warning("outside")
        with tracing.server_span("unsampled", ()):
            logger.warning("unsampled")
            observe_rpc("Test/Unsampled", "OK", "grpc", 0.003)
        with tracing.server_span("sampled", (("traceparent", SAMPLED),)) as span_, tracing.span("inner") as inner:
            logger.warning("inside")
            observe_rpc("Test/Sampled", "OK", "grpc", 0.003)
    finally:
        logger.removeHandler(handler)
    assert span_.get_span_context().trace_flags.sampled
    assert inner.get_span_context().trace_id == span_.get_span_context().trace_id
    ids = f"trace_id={CALLER_TRACE} span_id={hex_id(inner.get_span_context().span_id, 16)}"
    assert written.getvalue().splitlines() == ["WARNING outside", "WARNING unsampled", f"WARNING inside [{ids}]"]
    assert exemplar_of("Test/Unsampled") is None
    assert exemplar_of("Test/Sampled") == {"trace_id": CALLER_TRACE,
                                           "span_id": hex_id(inner.get_span_context().span_id, 16)}


# --- The HTTP face ------------------------------------------------------------------------------------------

async def test_an_http_request_with_a_traceparent_is_traced_under_the_callers_trace(traced, recall_target,
                                                                                    rerank_target):
    import httpx

    from gateway.config import GatewaySettings
    from gateway.servicer import build_server

    exporter = traced("parentbased_always_off")  # only what the caller sampled
    server = build_server(GatewaySettings(port=0, http_port=0, recall_targets=recall_target,
                                          rerank_targets=rerank_target))
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.listeners[0].port}", timeout=60) as http:
            body = {"query": "vitamin D deficiency", "top_k": 2, "recall_k": 5}
            untraced = await http.post("/v1/search", json=body)
            unsampled = await http.post("/v1/search", json=body, headers={"traceparent": NOT_SAMPLED})
            assert untraced.status_code == unsampled.status_code == 200
            assert exporter.get_finished_spans() == ()
            sampled = await http.post("/v1/search", json=body, headers={"traceparent": SAMPLED})
            assert sampled.status_code == 200
    finally:
        await server.stop(grace_s=1)
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.kind == SERVER]
    assert root.name == "POST /v1/search" and hex_id(root.parent.span_id, 16) == CALLER_SPAN
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["twostage.rpc"] == "Gateway/Search"
    assert {hex_id(s.context.trace_id, 32) for s in spans} == {CALLER_TRACE}
    assert {"search", "recall", "rerank", "twostage.v1.Recall/Search", "twostage.v1.Rerank/Rerank"} <= {
        s.name for s in spans}
    assert "vitamin" not in repr([(s.attributes, s.events) for s in spans])  # the query is not in its spans


# --- Set-up ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("environ, complaint", [
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratoi"}, "OTEL_TRACES_SAMPLER='parentbased_traceidratoi'"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1%"}, "OTEL_TRACES_SAMPLER_ARG='1%'"),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "5"}, "from 0 to 1"),
    ({}, "http://host:4317"),  # below: the endpoint
])
def test_setup_refuses_a_sampler_or_endpoint_it_cannot_honour(environ, complaint):
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4317" if not environ else "http://127.0.0.1:4317"}
    with pytest.raises(ConfigError, match=complaint.replace("(", r"\(").replace("%", "%")):
        tracing.setup("test", {**endpoint, **environ})
    assert not tracing.enabled


@pytest.mark.parametrize("endpoint", ["http://", "https://:4317", "grpc://collector:4317", "http://collector:port"])
def test_an_endpoint_that_is_not_a_collector_url_is_refused(endpoint):
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        tracing.setup("test", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint})
    assert tracing.check_endpoint("https://collector.monitoring:4317")


def test_a_server_started_with_a_bad_sampler_says_so_and_exits():
    import os

    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_SAMPLER": "ratio"}
    done = subprocess.run([sys.executable, "-m", "gateway", "--port", "0", "--recall-targets", "127.0.0.1:1",
                           "--rerank-targets", "127.0.0.1:1"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2
    assert "twostage: error: OTEL_TRACES_SAMPLER='ratio': twostage samples with" in done.stderr


def test_a_dead_collector_is_reported_once_a_minute_and_does_not_hold_up_shutdown(caplog, monkeypatch):
    assert tracing.setup("test", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1",  # nothing listens there
                                  "OTEL_BSP_SCHEDULE_DELAY": "10"})
    try:
        for i in range(50):
            with tracing.server_span("request", ()):
                pass
        time.sleep(0.5)  # the exporter tries, fails and retries meanwhile
    finally:
        started = time.monotonic()
        tracing.shutdown(timeout_s=1)
        assert time.monotonic() - started < 1.5
    exporting = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter")
    (limit,) = [f for f in exporting.filters if isinstance(f, tracing._RateLimited)]
    now = [1000.0]
    monkeypatch.setattr(tracing.time, "monotonic", lambda: now[0])
    limit._next_s, limit._held = 0.0, 0
    records = [logging.LogRecord(exporting.name, logging.WARNING, __file__, 1, "export failed", (), None)
               for _ in range(5)]
    assert [limit.filter(r) for r in records] == [True, False, False, False, False]
    now[0] += tracing.EXPORT_LOG_EVERY_S
    assert limit.filter(records[0]) and "4 more such lines" in records[0].getMessage()
