"""OpenTelemetry traces: set-up from the standard ``OTEL_*`` variables, W3C trace
context carried in gRPC metadata (or HTTP headers), spans for each hop, and the
trace id for exemplars and log lines.

Off unless configured: an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``OTEL_TRACES_EXPORTER=console``.
Off, nothing of the SDK is loaded and no interceptor is installed; every span
site costs one context-variable read.

On, the sampler (``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``, default
parent-based always on; a name or ratio the SDK does not know is refused at
start rather than silently sampling everything) decides once per request, where
it enters (``server_span``): the first tier a request reaches draws its trace id
and asks the sampler; a tier behind it follows its caller's decision. What runs
under an unsampled request makes no span object at all and touches no
OpenTelemetry context; the tiers it calls are told it is not sampled and do
nothing more. Calls to recall's Search and Embed and rerank's Rerank
(``DECLINED_IN_REQUEST``: what searches and the gateway's Embed and Rerank send)
are told in their request message, its ``trace_unsampled`` field, which decides
over any header (a tier older than that field samples such a call anew: upgrade
the stages before the gateway); any other call by a ``traceparent`` with flags
``00``. A header on every call costs the caller more than the tracing calls
themselves. Under a sampled request, spans are made and exported in batches from
a thread of their own (a bounded queue: with the collector down, spans beyond it
are dropped, and the exporter's complaints are logged at most once a minute),
never from the event loop.

Spans carry counts, sizes, times and codes, never what a caller sent: no query
or document text, no filter value, no error message (which may quote one); a
failed span says its exception's type (``error.type``) and its gRPC code.

Propagation is by hand rather than through the gRPC instrumentation package:
measured on a unary call over loopback (1,300 calls, each under a sampled
root span, three rounds), the instrumentation's client and server interceptors
added 0.24-0.29 ms a call, a traceparent injected here and one server span
0.12-0.22 ms; the instrumentation also wraps every servicer context in a proxy
and traces health checks. Only ``traceparent`` and ``tracestate`` are carried
(no baggage).
"""

import contextlib
import contextvars
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from urllib.parse import urlparse

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode

from twostage.errors import ConfigError

log = logging.getLogger(__name__)

enabled = False  # read on hot paths: a module attribute, not a call
_tracer: trace.Tracer = trace.NoOpTracer()
_provider = None
_root_sampled = None  # the sampler's decision for a request that arrives without a trace, by its trace id
INVALID_SPAN = trace.INVALID_SPAN
_NOOP = contextlib.nullcontext(INVALID_SPAN)  # reusable and reentrant
_EMPTY = Context()
EXPORTERS = ("otlp", "console", "none")
SAMPLERS = ("always_on", "always_off", "parentbased_always_on", "parentbased_always_off", "traceidratio",
            "parentbased_traceidratio")
MAX_LINKS = 128  # a batch span's links (the SDK's own default limit, made explicit)
EXPORT_LOG_EVERY_S = 60.0

# The request this task serves: True when it is sampled (its spans are current in OpenTelemetry's context), the
# metadata that carries its traceparent on (flags 00) when it is not (empty when its caller declined it in the
# request message, which carries no trace id), None outside any request or while tracing is off.
_REQUEST: contextvars.ContextVar[bool | tuple | None] = contextvars.ContextVar("twostage_trace", default=None)
_CHOSEN: contextvars.ContextVar[int] = contextvars.ContextVar("twostage_trace_id", default=0)
_UNSAMPLED_FLAGS = frozenset("02468ace")  # the last hex digit of a traceparent's flags, sampled bit clear
_SPAN_ID_BITS = (1 << 64) - 1
# The calls whose request message says, in ``trace_unsampled``, that its caller did not sample it: the ones
# searches and the gateway's Embed and Rerank make, where a header on every call would cost the most.
DECLINED_IN_REQUEST = frozenset({"twostage.v1.Recall/Search", "twostage.v1.Recall/Embed", "twostage.v1.Rerank/Rerank"})


def configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter not in EXPORTERS:
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: twostage exports traces with {', '.join(EXPORTERS)}")
    if exporter == "none":
        return False
    return exporter == "console" or bool(_endpoint(environ))


def _endpoint(environ: Mapping[str, str]) -> str:
    return (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or "").strip()


def check_endpoint(endpoint: str, name: str = "OTEL_EXPORTER_OTLP_ENDPOINT") -> str:
    """An OTLP/gRPC endpoint as the exporter takes it, or ConfigError saying what is wrong with it (the
    exporter itself would take ``collector:4317`` as a TLS address and fail at every export, quietly)."""
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{name}={endpoint!r}: give the collector as http://host:4317 (plaintext) or "
                          "https://host:4317 (TLS)")
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"{name}={endpoint!r}: the port is not a number") from None
    return endpoint


def sampler_from(environ: Mapping[str, str]):
    """(the SDK sampler the environment names, its decision for a request that arrives without a trace: a
    function of the trace id drawn for it), or ConfigError: the SDK's own reading falls back to sampling every
    request on a name or ratio it does not know, which would multiply tracing's cost unnoticed."""
    from opentelemetry.sdk.trace.sampling import _KNOWN_SAMPLERS, TraceIdRatioBased

    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower() or "parentbased_always_on"
    if name not in SAMPLERS:
        raise ConfigError(f"OTEL_TRACES_SAMPLER={name!r}: twostage samples with {', '.join(SAMPLERS)}")
    if not name.endswith("traceidratio"):
        everything = name.endswith("always_on")
        return _KNOWN_SAMPLERS[name], lambda trace_id: everything
    given = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(given) if given else 1.0
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={given!r}: the share of requests to sample, from 0 to 1 "
                          "(0.01 samples 1 in 100)")
    # The SDK's own test (TraceIdRatioBased.should_sample), without building its result: asked again when the
    # span is made, it answers the same for the same id.
    bound, low_bits = TraceIdRatioBased.get_bound_for_rate(ratio), TraceIdRatioBased.TRACE_ID_LIMIT
    return _KNOWN_SAMPLERS[name](ratio), lambda trace_id: trace_id & low_bits < bound


class _Ids:
    """The SDK's random ids, except a root's trace id when the sampler has already been asked about it."""

    def generate_trace_id(self) -> int:
        return _CHOSEN.get() or _random_id(128)

    def generate_span_id(self) -> int:
        return _random_id(64)

    def is_trace_id_random(self) -> bool:
        return True


def _random_id(bits: int) -> int:
    while not (value := random.getrandbits(bits)):
        pass
    return value


class _RateLimited(logging.Filter):
    """Lets one record through per ``every_s`` (per logger), saying how many it held back since: a collector
    that is down must not fill the log with a line per export attempt."""

    def __init__(self, every_s: float = EXPORT_LOG_EVERY_S):
        super().__init__()
        self.every_s = every_s
        self._next_s = 0.0
        self._held = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self._next_s:
                self._held += 1
                return False
            held, self._held, self._next_s = self._held, 0, now + self.every_s
        if held:
            record.msg = f"{record.msg} ({held} more such lines in the last {self.every_s:.0f} s held back)"
        return True


EXPORT_LOGGERS = ("opentelemetry.exporter.otlp.proto.grpc.exporter", "opentelemetry.sdk._shared_internal",
                  "opentelemetry.sdk.trace.export")


def setup(service: str, environ: Mapping[str, str] = os.environ, exporter=None) -> bool:
    """Start tracing for this process as ``twostage-<service>`` (unless OTEL_SERVICE_NAME or
    OTEL_RESOURCE_ATTRIBUTES name it) when the environment asks for it (or an ``exporter`` is given, which
    then receives each span as it ends); True if tracing is on. ConfigError for settings it cannot honour."""
    global enabled, _tracer, _provider, _root_sampled
    if enabled or (exporter is None and not configured(environ)):
        return enabled
    sampler, _root_sampled = sampler_from(environ)
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from twostage import __version__
    from twostage.logs import add_trace_ids

    if exporter is not None:
        processor, where = SimpleSpanProcessor(exporter), type(exporter).__name__
    elif environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stdout carries the line supervisors wait for
        processor, where = BatchSpanProcessor(ConsoleSpanExporter(out=sys.stderr)), "stderr"
    else:
        protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                    or "grpc")
        if protocol != "grpc":
            raise ConfigError(f"OTLP protocol {protocol!r}: twostage exports traces over gRPC (OTLP/gRPC, port 4317)")
        where = check_endpoint(_endpoint(environ), "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                               if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") else "OTEL_EXPORTER_OTLP_ENDPOINT")
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Bounded (OTEL_BSP_MAX_QUEUE_SIZE spans, 2048 by default): with the collector down the rest are dropped.
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=where))
        for name in EXPORT_LOGGERS:
            exporting = logging.getLogger(name)
            if not any(isinstance(f, _RateLimited) for f in exporting.filters):
                exporting.addFilter(_RateLimited())
    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"twostage-{service}"}))
    # Shut down by ``shutdown`` with a bound: at exit the SDK's own hook would wait for an unreachable collector.
    # Not made the global provider: twostage's spans are made here only, and a test may set tracing up again.
    _provider = TracerProvider(resource=resource, sampler=sampler, id_generator=_Ids(), shutdown_on_exit=False)
    _provider.add_span_processor(processor)
    _tracer = _provider.get_tracer("twostage", __version__)
    enabled = True
    add_trace_ids()
    log.info("tracing on: %s to %s, sampler %s", resource.attributes[SERVICE_NAME], where, sampler.get_description())
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is buffered, waiting at most ``timeout_s`` (blocking: call it off the event loop or at exit)."""
    global enabled, _tracer, _provider
    provider, _provider = _provider, None
    enabled, _tracer = False, trace.NoOpTracer()
    if provider is None:
        return
    worker = threading.Thread(target=provider.shutdown, name="trace-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)


def _failed(span_: Span, error: BaseException) -> None:
    """Mark a span failed by ``error``'s type alone (its message may quote what the caller sent)."""
    kind = type(error).__qualname__
    span_.set_attribute("error.type", kind)
    if span_.status.status_code is StatusCode.UNSET:
        span_.set_status(Status(StatusCode.ERROR, kind))


class _Active:
    """Makes a recording span current (and its request sampled) for what runs inside, whatever way that
    leaves (an exception and a cancellation included), and ends it unless told not to."""

    __slots__ = ("_context_token", "_request_token", "end_on_exit", "parent", "span")

    def __init__(self, span_: Span, parent: Context | None = None, end_on_exit: bool = True):
        self.span, self.parent, self.end_on_exit = span_, parent, end_on_exit

    def __enter__(self) -> Span:
        self._context_token = otel_context.attach(trace.set_span_in_context(self.span, self.parent))
        self._request_token = _REQUEST.set(True)
        return self.span

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is not None:
                _failed(self.span, error)
        finally:
            _REQUEST.reset(self._request_token)
            otel_context.detach(self._context_token)
            if self.end_on_exit:
                self.span.end()


class _Carry:
    """An unsampled request: the traceparent it came with or was given here (flags 00), carried to the tiers it
    calls (made into metadata once, not at every call), and no span of ours. None: its caller said so in the
    request message, with no trace id; each call made for it then carries a fresh one (``outgoing``)."""

    __slots__ = ("_token", "carried")

    def __init__(self, traceparent: str | None):
        self.carried = (("traceparent", traceparent),) if traceparent is not None else ()

    def __enter__(self) -> Span:
        self._token = _REQUEST.set(self.carried)
        return INVALID_SPAN

    def __exit__(self, *exc) -> None:
        _REQUEST.reset(self._token)


class _Detached:
    """Outside any request: for background work started from inside one (a task inherits its context)."""

    __slots__ = ("_context_token", "_request_token")

    def __enter__(self) -> None:
        self._request_token = _REQUEST.set(None)
        self._context_token = otel_context.attach(_EMPTY)

    def __exit__(self, *exc) -> None:
        otel_context.detach(self._context_token)
        _REQUEST.reset(self._request_token)


def detached():
    """A context in which tasks (and ``call_later`` callbacks) created belong to no request: background work a
    request sets off must not put its spans, links and exemplars in that request's trace after it ended."""
    return _Detached() if enabled else _NOOP


def sampled() -> bool:
    """Whether the current request is traced (its spans are kept)."""
    return _REQUEST.get() is True


def declined() -> bool:
    """Whether the current request is one the tracing decided not to sample (False while tracing is off and
    outside any request): a call made for it sets the request's ``trace_unsampled`` field where it has one."""
    return type(_REQUEST.get()) is tuple


def span(name: str, kind: SpanKind = SpanKind.INTERNAL):
    """A context manager for a span, child of the current one and current within it: the no-op one while
    tracing is off, outside a request or in an unsampled one. Set attributes inside, after checking
    ``is_recording()``."""
    if _REQUEST.get() is not True:
        return _NOOP
    return _Active(_tracer.start_span(name, kind=kind))


def current_span() -> Span:
    """The current span of a sampled request (the invalid, non-recording span otherwise)."""
    return trace.get_current_span() if _REQUEST.get() is True else trace.INVALID_SPAN


def current_context() -> SpanContext | None:
    """The current span's context, to link to later (None while tracing is off, outside a span, or in an
    unsampled request: nothing would keep the link)."""
    if _REQUEST.get() is not True:
        return None
    context = trace.get_current_span().get_span_context()
    return context if context.trace_flags.sampled else None


def extract(headers: Mapping[str, str] | Iterable[tuple[str, str | bytes]] | None) -> Context:
    """The caller's trace context (W3C ``traceparent``/``tracestate``) from gRPC metadata or HTTP headers,
    whatever the case of their names."""
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    return propagate.extract({key.lower(): value for key, value in items if isinstance(value, str)})


def _traceparent(headers) -> str | None:
    """The ``traceparent`` of gRPC metadata (names are lower case on the wire) or of a case-insensitive
    mapping (Starlette's headers)."""
    if type(headers) is tuple:  # grpc.aio's invocation metadata: ((key, value), ...)
        for key, value in headers:
            if key == "traceparent":
                return value if type(value) is str else None
        return None
    if headers is None:
        return None
    value = headers.get("traceparent") if isinstance(headers, Mapping) else dict(headers).get("traceparent")
    return value if isinstance(value, str) else None


def unsampled(traceparent: str) -> bool:
    """Whether a traceparent says its request is not sampled (the sampled bit of its flags is clear): one
    look at one character, for a tier that only has to stay out of the way."""
    return len(traceparent) >= 55 and traceparent[54] in _UNSAMPLED_FLAGS


def _unsampled_traceparent(ids: int | None = None) -> str:
    """A W3C traceparent with flags 00 for trace and span ids ``ids`` (192 random bits; drawn when None)."""
    if ids is None:
        ids = random.getrandbits(192)
    if ids >> 64 and ids & _SPAN_ID_BITS:  # W3C: neither id may be all zeros
        ids_hex = ids.to_bytes(24, "big").hex()  # both at once: half the cost of formatting each
        return f"00-{ids_hex[:32]}-{ids_hex[32:]}-00"
    return f"00-{_random_id(128):032x}-{_random_id(64):016x}-00"


def outgoing(metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``metadata`` plus the current request's trace context, for a call to another tier."""
    state = _REQUEST.get()
    if state is None:
        return metadata
    if state is not True:  # unsampled: its traceparent, flags 00, so that the callee does not sample it either
        if not state:  # declined in the request message that reached this tier: no trace id came with it
            state = (("traceparent", _unsampled_traceparent()),)
        return metadata + state if metadata else state
    context = trace.get_current_span().get_span_context()
    carried = ("traceparent", f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}")
    if context.trace_state:
        return (*metadata, carried, ("tracestate", context.trace_state.to_header()))
    return (*metadata, carried)


def server_span(name: str, headers, kind: SpanKind = SpanKind.SERVER, declined_by_caller: bool = False):
    """A span for a request received with these headers (gRPC metadata or HTTP), child of the caller's when
    they carry one. The sampling decision is the caller's when it sent one (``declined_by_caller``, the
    request's ``trace_unsampled`` field, first; else a traceparent), else taken here, once; an unsampled
    request gets no span, only what to carry on to the tiers it calls."""
    if not enabled:
        return _NOOP
    if declined_by_caller:
        return _Carry(None)
    given = _traceparent(headers)
    if given is not None:
        if unsampled(given):
            return _Carry(given)
        parent = extract(headers)
        if trace.get_current_span(parent).get_span_context().is_valid:
            return _begin(_tracer.start_span(name, context=parent, kind=kind), parent)
    # The first tier this request reaches: its trace id is drawn and the sampler asked, once. Unsampled, it still
    # gets a traceparent (flags 00, a span id drawn with the trace id) for the tiers it calls to follow.
    ids = random.getrandbits(192)
    trace_id = ids >> 64
    if not _root_sampled(trace_id):
        return _Carry(_unsampled_traceparent(ids))
    chosen = _CHOSEN.set(trace_id)  # the span the sampler was asked about gets this id
    try:
        return _begin(_tracer.start_span(name, context=_EMPTY, kind=kind), _EMPTY)
    finally:
        _CHOSEN.reset(chosen)


def _begin(span_: Span, parent: Context):
    if span_.is_recording():
        return _Active(span_, parent)
    # Sampled out here although the caller's was sampled (a sampler that is not parent-based): tiers behind
    # follow this decision.
    context = span_.get_span_context()
    return _Carry(_unsampled_traceparent(context.trace_id << 64 | context.span_id))


def exemplar() -> dict[str, str] | None:
    """The current sampled trace, as a Prometheus exemplar's labels (None otherwise)."""
    if _REQUEST.get() is not True:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.trace_flags.sampled:
        return None
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def _wall_ns(monotonic_s: float) -> int:
    """A time.monotonic() instant as the wall-clock nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def record(name: str, start_s: float, end_s: float, attributes: dict | None = None) -> None:
    """A span, child of the current one, for something already over (times on the time.monotonic() clock)."""
    if _REQUEST.get() is not True:
        return
    done = _tracer.start_span(name, attributes=attributes, start_time=_wall_ns(start_s))
    done.end(end_time=_wall_ns(end_s))


def batch_span(name: str, served: Iterable[SpanContext | None], start_s: float) -> Span | None:
    """A span for work done once for many requests (a model batch), begun at ``start_s`` (monotonic): it links
    to the span of every sampled request it served (up to MAX_LINKS of them; ``twostage.batch.traced`` says
    how many there were) and belongs to the trace of the first one, so it is kept whenever one of its requests
    is. None when no request it served was sampled. End it with ``end``."""
    if not enabled:
        return None
    contexts = list({(c.trace_id, c.span_id): c for c in served if c is not None and c.trace_flags.sampled}.values())
    if not contexts:
        return None
    return _tracer.start_span(name, context=trace.set_span_in_context(NonRecordingSpan(contexts[0]), _EMPTY),
                              links=[Link(c) for c in contexts[:MAX_LINKS]], start_time=_wall_ns(start_s),
                              attributes={"twostage.batch.traced": len(contexts)})


def end(span_: Span | None, end_s: float) -> None:
    if span_ is not None:
        span_.end(end_time=_wall_ns(end_s))


def use(span_: Span | None):
    """Make ``span_`` current (without ending it) for what runs inside; nothing for None."""
    return _NOOP if span_ is None else _Active(span_, end_on_exit=False)


def client_span(method: str, peer: str, target: str):
    """A span for one call to another tier made for a sampled request (check ``sampled()`` first: the no-op one
    otherwise); ``outgoing`` inside it carries it to the callee."""
    if _REQUEST.get() is not True:
        return _NOOP  # ``outgoing`` still carries an unsampled request's traceparent to the callee
    return _Active(_tracer.start_span(method, kind=SpanKind.CLIENT, attributes={
        "rpc.system": "grpc", "rpc.method": method.rsplit("/", 1)[-1], "server.address": target,
        "twostage.peer": peer}))


def rpc_started(span_: Span, method: str, replica: str) -> None:
    """A gRPC server span's attributes (``method``: "twostage.v1.Recall/Search")."""
    service, name = method.rsplit("/", 1)
    span_.set_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
                          "twostage.replica": replica})


def rpc_ended(span_: Span, code: grpc.StatusCode | None) -> None:
    """A gRPC server span's outcome: its status code (only: its details may quote the request)."""
    if code is not None:
        span_.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span_.set_status(Status(StatusCode.ERROR, code.name))
