"""Logging for every service: text for people, JSON lines for log pipelines.

TWOSTAGE_LOG_FORMAT=json emits one JSON object per line with the request id
(the gateway passes its request id to both stages, so one search can be
followed across services). Per-RPC access lines are at DEBUG unless
TWOSTAGE_ACCESS_LOG=1. While tracing is on (twostage.tracing), a line written
for a sampled request carries the trace_id and span_id it was written under
(ids that open a kept trace): fields in JSON, a suffix in text. Lines of
unsampled requests have none; their request id ties them together.
"""

import logging
import os
import sys

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now (test runners and daemons swap it), not the one at start."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _TextFormatter(logging.Formatter):
    """The text format, with the trace and span ids when the line was written inside a traced span."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        return f"{line} [trace_id={trace_id} span_id={record.span_id}]" if trace_id else line


class TraceIds(logging.Filter):
    """Adds the current span's trace_id and span_id to each record written inside a sampled request's span
    (elsewhere one context-variable read)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from twostage.tracing import current_context

        context = current_context()
        if context is not None:
            record.trace_id = f"{context.trace_id:032x}"
            record.span_id = f"{context.span_id:016x}"
        return True


def add_trace_ids() -> None:
    """Stamp trace and span ids on every line from now on (tracing turns this on; off, nothing is added)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TraceIds) for f in handler.filters):
            handler.addFilter(TraceIds())


def configure(level: str) -> None:
    handler = _CurrentStderr()
    if os.environ.get("TWOSTAGE_LOG_FORMAT", "text") == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    access = os.environ.get("TWOSTAGE_ACCESS_LOG", "0") == "1"
    logging.getLogger("twostage.access").setLevel(logging.INFO if access else logging.WARNING)
