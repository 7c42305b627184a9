"""Hosts as Linux network namespaces on one bridge, for fault campaigns.

Each host is a namespace with one veth pair: ``eth0`` inside (the host's
address, with ``lo`` up) and the other end on a bridge in the root namespace,
which holds the first address of the subnet, so the campaign itself (writer,
searcher, checker) reaches every host from the root namespace. Cutting a
host's link on the bridge side partitions it from everyone at once.

Every name starts with one prefix; ``Network.create`` first removes what an
earlier run left with that prefix (after a crash, say), and ``remove`` takes
down everything: processes, tmpfs mounts, namespaces, links and temp dirs.
Needs root and iproute2; anything else is an error that says so.
"""

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from twostage.errors import TwostageError

IP_TIMEOUT_S = 15.0
MAX_HOSTS = 64


class HostsError(TwostageError):
    """Namespaces, links or a host's process could not be set up; the message says which and why."""


async def run_command(*argv: str, timeout_s: float = IP_TIMEOUT_S, check: bool = True) -> str:
    """Run a short command without blocking the event loop; its stdout, or HostsError on failure."""
    try:
        process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise HostsError(f"{argv[0]} is not installed (needed to create network namespaces)") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise HostsError(f"'{' '.join(argv)}' took over {timeout_s:.0f} s") from None
    if check and process.returncode != 0:
        raise HostsError(f"'{' '.join(argv)}' failed ({process.returncode}): {err.decode(errors='replace').strip()}")
    return out.decode(errors="replace")


@dataclass
class Host:
    name: str  # short: namespaces and links are named prefix + name (links at most 15 characters)
    address: str
    namespace: str
    link: str  # the bridge-side end of its veth pair
    volume: Path | None = None  # a tmpfs of its own, when mounted
    argv: list[str] = field(default_factory=list)
    service: str = ""
    process: asyncio.subprocess.Process | None = None
    output: list[str] = field(default_factory=list)  # the last lines it printed, for error messages
    _ready: asyncio.Event | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, signum: int) -> None:
        if self.alive:
            self.process.send_signal(signum)


class Network:
    """A bridge and the hosts on it. Use ``async with Network(...)``, or ``create`` then ``remove`` in a finally."""

    def __init__(self, prefix: str = "ts-", subnet: str = "198.18.0", first_host: int = 10,
                 cwd: Path | None = None, python: str = sys.executable):
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,5}", prefix):
            raise HostsError(f"prefix {prefix!r}: expected 1-6 lowercase letters, digits or '-'")
        self.prefix = prefix
        self.subnet = subnet
        self.bridge = prefix + "br"
        self.gateway_address = f"{subnet}.1"
        self.first_host = first_host
        self.cwd = cwd or Path(__file__).resolve().parents[2]
        self.python = python
        self.hosts: dict[str, Host] = {}
        self.workdir: Path | None = None

    async def __aenter__(self) -> Self:
        await self.create()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.remove()

    async def create(self) -> None:
        if os.geteuid() != 0:
            raise HostsError("network namespaces need root (ip netns add, veth pairs, a bridge, tmpfs mounts); "
                             "run as root")
        if shutil.which("ip") is None:
            raise HostsError("iproute2's 'ip' is not on PATH; install iproute2")
        await self.remove_leftovers()
        self.workdir = Path(tempfile.mkdtemp(prefix=self.prefix + "hosts-"))
        await run_command("ip", "link", "add", self.bridge, "type", "bridge")
        await run_command("ip", "addr", "add", f"{self.gateway_address}/24", "dev", self.bridge)
        await run_command("ip", "link", "set", self.bridge, "up")

    async def add_host(self, name: str, volume_mib: int = 0) -> Host:
        if len(self.hosts) >= MAX_HOSTS:
            raise HostsError(f"at most {MAX_HOSTS} hosts")
        link = self.prefix + name
        if len(link) + 2 > 15 or not re.fullmatch(r"[a-z0-9]+", name):
            raise HostsError(f"host name {name!r}: lowercase letters and digits, {13 - len(self.prefix)} at most")
        host = Host(name, f"{self.subnet}.{self.first_host + len(self.hosts)}", link, link)
        self.hosts[name] = host
        ns = host.namespace
        await run_command("ip", "netns", "add", ns)
        # Both ends are made in the root namespace, then one moves in and is renamed eth0.
        await run_command("ip", "link", "add", link, "type", "veth", "peer", "name", link + "-p")
        await run_command("ip", "link", "set", link + "-p", "netns", ns)
        await run_command("ip", "netns", "exec", ns, "ip", "link", "set", link + "-p", "name", "eth0")
        await run_command("ip", "netns", "exec", ns, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        await run_command("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
        await run_command("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        await run_command("ip", "link", "set", link, "master", self.bridge)
        await run_command("ip", "link", "set", link, "up")
        if volume_mib:
            host.volume = self.workdir / name
            host.volume.mkdir()
            await run_command("mount", "-t", "tmpfs", "-o", f"size={volume_mib}m", f"{self.prefix}vol",
                              str(host.volume))
        return host

    # -- processes ------------------------------------------------------------------------------------------

    async def start(self, host: Host, module: str, *flags: str, service: str, ready_timeout_s: float) -> None:
        """Start ``python -m module`` in the host's namespace and wait for its '<service> serving on port' line."""
        host.argv = ["ip", "netns", "exec", host.namespace, self.python, "-m", module, *flags]
        host.service = service
        await self.restart(host, ready_timeout_s)

    async def restart(self, host: Host, ready_timeout_s: float) -> None:
        """Start the host's process again, same arguments (its volume kept), and wait until it serves."""
        if host.alive:
            raise HostsError(f"{host.name} is still running")
        host.output.clear()
        host._ready = asyncio.Event()
        host.process = await asyncio.create_subprocess_exec(
            *host.argv, cwd=self.cwd, env=os.environ | {"PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )
        asyncio.get_running_loop().create_task(self._read(host, host.process, host._ready))
        ready = asyncio.ensure_future(host._ready.wait())
        exited = asyncio.ensure_future(host.process.wait())
        try:
            await asyncio.wait([ready, exited], timeout=ready_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if not host._ready.is_set():
            tail = "\n".join(host.output[-15:])
            if host.process.returncode is not None:
                raise HostsError(f"{host.name} ({host.service}) exited with {host.process.returncode} before "
                                 f"serving:\n{tail}")
            await self.kill(host)  # a process that never became ready is not left running
            raise HostsError(f"{host.name} ({host.service}) not serving after {ready_timeout_s:.0f} s:\n{tail}")

    @staticmethod
    async def _read(host: Host, process: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        """Keep the last lines (the pipe must be drained or the child blocks); the announcement marks it ready."""
        while line := await process.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            if text.startswith(f"{host.service} serving on port"):
                ready.set()
            if process is host.process:
                host.output.append(text)
                del host.output[:-50]

    async def stop(self, host: Host, timeout_s: float = 10.0) -> None:
        """SIGTERM (after SIGCONT, in case it is paused), then SIGKILL past the timeout."""
        if not host.alive:
            return
        host.signal(signal.SIGCONT)
        host.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(host.process.wait(), timeout_s)
        except TimeoutError:
            host.signal(signal.SIGKILL)
            await host.process.wait()

    async def kill(self, host: Host) -> None:
        host.signal(signal.SIGKILL)
        await host.process.wait()

    # -- faults ---------------------------------------------------------------------------------------------

    async def partition(self, host: Host) -> None:
        """Cut the host off from every other host and from the root namespace."""
        await run_command("ip", "link", "set", host.link, "down")

    async def heal(self, host: Host) -> None:
        await run_command("ip", "link", "set", host.link, "up")

    # -- teardown -------------------------------------------------------------------------------------------

    async def remove(self) -> None:
        """Remove everything this network made; best effort, every step tried even if one fails."""
        await asyncio.gather(*(self.stop(h, 5.0) for h in self.hosts.values()), return_exceptions=True)
        self.hosts.clear()
        await self.remove_leftovers()

    async def remove_leftovers(self) -> None:
        """Everything named with this prefix: processes in its namespaces, its mounts, namespaces, links, dirs."""
        namespaces = [line.split()[0] for line in (await run_command("ip", "netns", "list", check=False)).splitlines()
                      if line.startswith(self.prefix)]
        for ns in namespaces:
            await self._kill_namespace_processes(ns)
        temp = Path(tempfile.gettempdir())
        table = await asyncio.to_thread(Path("/proc/mounts").read_text)
        mounts = [line.split()[1] for line in table.splitlines()
                  if line.split()[1].startswith(str(temp / self.prefix))]
        for mountpoint in sorted(mounts, reverse=True):
            await run_command("umount", "-l", mountpoint, check=False)
        for ns in namespaces:
            await run_command("ip", "netns", "delete", ns, check=False)
        links = re.findall(r"^\d+: ([^:@\s]+)", await run_command("ip", "-o", "link", "show", check=False), re.MULTILINE)
        for link in links:
            # A veth pair goes with either end; the bridge last (its ports are gone by then).
            if link.startswith(self.prefix) and link != self.bridge:
                await run_command("ip", "link", "delete", link, check=False)
        if self.bridge in links:
            await run_command("ip", "link", "delete", self.bridge, check=False)
        # Also the campaign's own temp dirs (same prefix) that a crashed run left.
        for leftover in temp.glob(self.prefix + "*"):
            await asyncio.to_thread(shutil.rmtree, leftover, True)
        self.workdir = None

    @staticmethod
    async def _kill_namespace_processes(ns: str, timeout_s: float = 5.0) -> None:
        pids = [int(p) for p in (await run_command("ip", "netns", "pids", ns, check=False)).split()]
        for pid in pids:
            for signum in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    break
        deadline = time.monotonic() + timeout_s
        while pids and time.monotonic() < deadline:
            pids = [int(p) for p in (await run_command("ip", "netns", "pids", ns, check=False)).split()]
            if pids:
                await asyncio.sleep(0.05)  # polling the namespace's process list until it empties
