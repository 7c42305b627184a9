"""Live membership: the addresses behind each configured target, re-resolved
while serving (Envoy's strict-DNS cluster model).

A target is ``host:port`` (one address, resolved by gRPC itself),
``dns:///name:port`` (every address the name resolves to: a Kubernetes
headless Service's ready pods), a ``|``-separated list of ``host:port``, or
``file:///path`` (one ``host:port`` per line, re-read: for service
discovery that writes files). Resolution never blocks the event loop: DNS
goes through the loop's resolver executor and files are read in a thread.
A failed resolution keeps the last good answer; a name that resolves to
nothing (a rollout, a scale to zero) leaves the target empty until it
resolves again.
"""

import asyncio
import logging
import socket
from pathlib import Path

from twostage.errors import ConfigError

log = logging.getLogger(__name__)


def split_targets(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _host_port(address: str, port: str) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def check_target(spec: str) -> None:
    """A malformed target is a configuration error at start, not a surprise at the first request."""
    if spec.startswith("file:///"):
        return
    for part in spec.removeprefix("dns:///").split("|"):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"target {spec!r}: expected host:port, dns:///name:port, a|b or file:///path")


class Target:
    """One configured target and the addresses it resolved to last."""

    def __init__(self, spec: str):
        check_target(spec)
        self.spec = spec
        self.addresses: list[str] = [] if self.dynamic else spec.split("|")

    @property
    def dynamic(self) -> bool:
        return self.spec.startswith(("dns:///", "file:///"))

    async def resolve(self) -> list[str]:
        """Re-resolve; on failure keep (and return) the last good answer."""
        if not self.dynamic:
            return self.addresses
        try:
            if self.spec.startswith("file:///"):
                found = await asyncio.to_thread(self._read_file)
            else:
                found = await self._resolve_dns()
        except (OSError, UnicodeDecodeError) as error:
            log.warning("cannot resolve %s (keeping %d addresses): %s", self.spec, len(self.addresses), error)
            return self.addresses
        if found != self.addresses:
            log.info("%s now resolves to %s", self.spec, ", ".join(found) or "nothing")
        self.addresses = found
        return found

    async def _resolve_dns(self) -> list[str]:
        host, port = self.spec.removeprefix("dns:///").rsplit(":", 1)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            if error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", -5)):
                return []  # the name exists no more (or not yet): no members
            raise
        return sorted({_host_port(info[4][0], port) for info in infos})

    def _read_file(self) -> list[str]:
        path = Path(self.spec.removeprefix("file://"))
        lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
        return sorted({line for line in lines if line})
