"""A local OTLP/gRPC trace receiver: what ``bench gateway`` exports its traces
to (a collector's work, without one), and where tests read the spans the
servers sent. Spans arrive flattened into ``ReceivedSpan``."""

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 1 internal, 2 server, 3 client
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    start_ns: int
    end_ns: int
    attributes: dict = field(default_factory=dict)
    links: tuple[tuple[str, str], ...] = ()  # (trace_id, span_id)
    events: tuple[tuple[str, dict], ...] = ()
    error: bool = False


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _attributes(key_values) -> dict:
    return {kv.key: _value(kv.value) for kv in key_values}


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: "OtlpReceiver"):
        self.receiver = receiver

    def Export(self, request, context):
        received = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        s.start_time_unix_nano, s.end_time_unix_nano, _attributes(s.attributes),
                        tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                        tuple((e.name, _attributes(e.attributes)) for e in s.events),
                        s.status.code == s.status.STATUS_CODE_ERROR))
        self.receiver._add(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Listens on 127.0.0.1 (a free port unless given); ``endpoint`` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self, port: int = 0):
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._spans: list[ReceivedSpan] = []
        self._arrived = threading.Condition()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OtlpReceiver":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._arrived:
            self._spans.extend(spans)
            self._arrived.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._arrived:
            return list(self._spans)

    def clear(self) -> None:
        with self._arrived:
            self._spans.clear()

    def wait_quiet(self, quiet_s: float = 0.5, timeout_s: float = 15.0) -> None:
        """Until no span has arrived for ``quiet_s`` (or ``timeout_s`` has passed); blocking."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while time.monotonic() < deadline:
                count = len(self._spans)
                self._arrived.wait(min(quiet_s, max(0.0, deadline - time.monotonic())))
                if len(self._spans) == count:
                    return

    def wait_for(self, done, timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """The spans received once ``done(spans)`` holds; TimeoutError if it does not within ``timeout_s``
        (blocking: call it from a thread)."""
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while not done(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({(s.service, s.name) for s in self._spans})
                    raise TimeoutError(f"spans not received within {timeout_s:.0f} s; received: {names}")
                self._arrived.wait(left)
            return list(self._spans)
