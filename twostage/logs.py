"""Logging for every service: text for people, JSON lines for log pipelines.

TWOSTAGE_LOG_FORMAT=json emits one JSON object per line with the request id
(the gateway passes its request id to both stages, so one search can be
followed across services). Per-RPC access lines are at DEBUG unless
TWOSTAGE_ACCESS_LOG=1.
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


def configure(level: str) -> None:
    handler = _CurrentStderr()
    if os.environ.get("TWOSTAGE_LOG_FORMAT", "text") == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    access = os.environ.get("TWOSTAGE_ACCESS_LOG", "0") == "1"
    logging.getLogger("twostage.access").setLevel(logging.INFO if access else logging.WARNING)
