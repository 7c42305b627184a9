"""The three tiers as local child processes: ``twostage serve all``, ``demo``,
``eval`` and the benchmarks run the same topology a cluster does.

Each child prints one line once it serves (``GrpcService.describe``); the
stack forwards its output and counts a child ready only on that line, so a
stack never reports ready on the strength of someone else's server holding
its ports.

A command that runs a stack does so in ``async with stack.running(...)``:
SIGTERM, SIGINT or SIGHUP then stops the three tiers before the command
exits (with ``Interrupted``), so none is left holding its ports and CPU.
"""

import asyncio
import contextlib
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from twostage.errors import TwostageError


class StackError(TwostageError):
    """A child failed to start or exited; the message says which and how."""


class Interrupted(Exception):
    """A stop signal ended the command; its stack was stopped first."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class Child:
    name: str  # "recall shard 0", "rerank replica 1", "gateway"
    service: str  # the name it announces itself with
    target: str
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def exit_description(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            return f"{self.name} (pid {self.process.pid}) was killed by {signal.Signals(-code).name}"
        return f"{self.name} (pid {self.process.pid}) exited with code {code}"


def check_ports_free(host: str, ports: list[int]) -> None:
    for port in ports:
        try:
            with socket.create_server((host, port)):
                pass
        except OSError as error:
            raise StackError(
                f"port {host}:{port} is in use ({error.strerror}); another stack may be running: stop it or "
                "choose another --port"
            ) from None


def check_index_dir(index_dir: str | None, shards: int) -> list[str | None]:
    """The index directory of each recall shard, each checked to hold an index."""
    from recall_server.build import shard_dirs
    from recall_server.config import RecallSettings
    from recall_server.index import MANIFEST

    if shards > 1:
        if index_dir is None:
            raise StackError("--recall-shards needs --index-dir with shard-0 .. shard-N subdirectories")
        dirs = [str(d) for d in shard_dirs(Path(index_dir), shards)]
    else:
        dirs = [index_dir]
    for directory in dirs:
        path = Path(directory) if directory else RecallSettings().index_dir
        if not (path / MANIFEST).is_file():
            hint = "twostage index build --shards N" if shards > 1 else "twostage index build (or twostage demo)"
            raise StackError(f"no index at {path}; build one with '{hint}'")
    return dirs


class Stack:
    """The three tiers as child processes, started in order and stopped together."""

    def __init__(self, host: str, port: int, index_dir: str | None, rerank_replicas: int = 1, recall_shards: int = 1,
                 metrics_port: int = 0, embed_model: str | None = None, rerank_model: str | None = None,
                 tls_dir: str | None = None, auth_tokens: str | None = None, shard_replicas: int = 1,
                 http_port: int | None = None, settings_file: str | None = None):
        if not all(1 <= n <= 64 for n in (recall_shards, rerank_replicas, shard_replicas)):
            raise StackError("--recall-shards, --shard-replicas and --rerank-replicas must be between 1 and 64")
        self.host = host
        self.gateway_target = f"{host}:{port}"
        recall_processes = recall_shards * shard_replicas
        # Shard i's replicas, as the gateway takes them: one target "a|b|..." per shard.
        self.shard_targets = [[f"{host}:{port + 1 + i * shard_replicas + j}" for j in range(shard_replicas)]
                              for i in range(recall_shards)]
        self.recall_targets = [target for replicas in self.shard_targets for target in replicas]
        self.rerank_targets = [f"{host}:{port + 1 + recall_processes + i}" for i in range(rerank_replicas)]
        self.http_port = http_port  # the gateway's HTTP/JSON face; None: off
        self.index_dirs = check_index_dir(index_dir, recall_shards)
        self._replica_copies: Path | None = None
        self.metrics_port = metrics_port
        self.embed_model = embed_model
        self.rerank_model = rerank_model
        self.tls_dir = tls_dir
        self.auth_tokens = auth_tokens
        self.settings_file = settings_file
        self._secrets: Path | None = None
        self.children: list[Child] = []
        self.exit_code = 0  # from stop(): 0 when every child stopped cleanly

    def _security_flags(self) -> tuple[list[str], list[str]]:
        """(flags for the stages, flags for the gateway). With auth, the gateway gets its own admin token for
        the stages, made for this run and stored beside the caller's tokens in a private directory."""
        common = ["--tls-dir", self.tls_dir] if self.tls_dir else []
        if self.settings_file:
            common += ["--settings-file", str(Path(self.settings_file).resolve())]
        if not self.auth_tokens:
            return common, common
        from twostage.auth import new_token, token_line

        self._secrets = Path(tempfile.mkdtemp(prefix="twostage-stack-"))  # mode 0700
        token = new_token()
        # The stages read the caller's file itself (so a revocation reaches them) and the gateway's token beside it.
        gateway_tokens = self._secrets / "gateway-tokens"
        gateway_tokens.write_text(token_line(token, "admin", "gateway (this serve all run)"))
        token_file = self._secrets / "gateway-token"
        token_file.write_text(token + "\n")
        return ([*common, "--auth-tokens", str(Path(self.auth_tokens).resolve()), "--auth-tokens-extra", str(gateway_tokens)],
                [*common, "--auth-tokens", self.auth_tokens, "--stage-token-file", str(token_file)])

    @property
    def targets(self) -> list[str]:
        return [self.gateway_target, *self.recall_targets, *self.rerank_targets]

    def metrics_ports(self) -> dict[str, int]:
        """gateway on --metrics-port, then each recall shard, then each rerank replica."""
        if not self.metrics_port:
            return {}
        return {target: self.metrics_port + i for i, target in enumerate(self.targets)}

    async def _spawn(self, child: Child, module: str, *flags: str) -> None:
        port = child.target.rsplit(":", 1)[1]
        if metrics := self.metrics_ports().get(child.target):
            flags = (*flags, "--metrics-port", str(metrics))
        child.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, "--host", self.host, "--port", port, *flags, stdout=asyncio.subprocess.PIPE
        )
        self.children.append(child)
        asyncio.get_running_loop().create_task(self._forward(child))

    @staticmethod
    async def _forward(child: Child) -> None:
        """Echo the child's output; its announcement line marks it ready."""
        while line := await child.process.stdout.readline():
            text = line.decode(errors="replace")
            if text.startswith(f"{child.service} serving on port"):
                child.ready.set()
            sys.stdout.write(text)
            sys.stdout.flush()

    def alive(self) -> bool:
        return all(c.process.returncode is None for c in self.children)

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.process.returncode is not None]

    async def start(self, ready_timeout_s: float) -> None:
        check_ports_free(self.host, [int(t.rsplit(":", 1)[1]) for t in self.targets] + list(self.metrics_ports().values())
                         + ([self.http_port] if self.http_port else []))
        stage_flags, gateway_flags = self._security_flags()
        embed = ["--model", self.embed_model] if self.embed_model else []
        for i, (replicas, index_dir) in enumerate(zip(self.shard_targets, self.index_dirs)):
            for j, target in enumerate(replicas):
                replica_dir = index_dir if j == 0 else await asyncio.to_thread(self._replica_copy, index_dir, i, j)
                name = f"recall shard {i}" + (f" replica {j}" if len(replicas) > 1 else "")
                await self._spawn(Child(name, "recall", target), "recall_server",
                                  *(["--index-dir", replica_dir] if replica_dir else []), *embed, *stage_flags)
        for i, target in enumerate(self.rerank_targets):
            await self._spawn(Child(f"rerank replica {i}", "rerank", target), "rerank_server",
                              *(["--model", self.rerank_model] if self.rerank_model else []), *stage_flags)
        await self._spawn(Child("gateway", "gateway", self.gateway_target), "gateway",
                          "--recall-targets", ",".join("|".join(replicas) for replicas in self.shard_targets),
                          "--rerank-targets", ",".join(self.rerank_targets), *gateway_flags,
                          *(["--http-port", str(self.http_port)] if self.http_port is not None else []))
        await self._wait_ready(self.children, ready_timeout_s)

    def _replica_copy(self, index_dir: str | None, shard: int, replica: int) -> str:
        """Replica 0 of a shard serves the shard's index; each other replica its own copy, made for this run
        (every replica takes every write of its shard, as in a cluster)."""
        from recall_server.config import RecallSettings

        if self._replica_copies is None:
            self._replica_copies = Path(tempfile.mkdtemp(prefix="twostage-replicas-"))
        target = self._replica_copies / f"shard-{shard}-replica-{replica}"
        shutil.copytree(index_dir or RecallSettings().index_dir, target, ignore=shutil.ignore_patterns(".lock"))
        return str(target)

    async def _wait_ready(self, children: list[Child], timeout_s: float) -> None:
        exits = {asyncio.ensure_future(c.process.wait()): c for c in children}
        readies = [asyncio.ensure_future(c.ready.wait()) for c in children]
        try:
            pending_ready = set(readies)
            while pending_ready:
                done, _ = await asyncio.wait([*pending_ready, *exits], timeout=timeout_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    waiting = ", ".join(c.name for c in children if not c.ready.is_set())
                    raise StackError(f"not serving after {timeout_s:.0f} s: {waiting}")
                if exited := [exits[t] for t in done if t in exits]:
                    raise StackError(f"{exited[0].exit_description()} before it was ready (its error is above)")
                pending_ready -= done
        finally:
            for task in [*exits, *readies]:
                task.cancel()

    async def wait_any_exit(self) -> Child:
        """Wait until some child exits; return it."""
        tasks = {asyncio.ensure_future(c.process.wait()): c for c in self.children}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        return tasks[next(iter(done))]

    @contextlib.asynccontextmanager
    async def running(self, ready_timeout_s: float):
        """Start the stack and stop it on leaving, however that happens. Meanwhile SIGTERM, SIGINT and SIGHUP
        cancel what the block awaits (the start included); the block is left with ``Interrupted`` once the
        stack has stopped."""
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        received: list[int] = []

        def on_signal(signum: int) -> None:
            if not received:  # a second signal while stopping changes nothing
                received.append(signum)
                print(f"{signal.Signals(signum).name}: stopping the local stack", file=sys.stderr, flush=True)
                task.cancel()

        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await self.start(ready_timeout_s)
            yield self
        except asyncio.CancelledError:
            if not received:
                raise
            task.uncancel()
            raise Interrupted(received[0]) from None
        finally:
            try:
                await self.stop()
            finally:
                for signum in STOP_SIGNALS:
                    loop.remove_signal_handler(signum)

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the gateway first (no new searches), then the stages; kill stragglers.
        Returns 0 if every child stopped cleanly."""
        for child in self.children[::-1]:
            if child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)
        codes = []
        for child in self.children:
            try:
                codes.append(await asyncio.wait_for(child.process.wait(), timeout_s))
            except TimeoutError:
                child.process.kill()
                codes.append(await child.process.wait())
        for private in (self._secrets, self._replica_copies):
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)
        self.exit_code = max((abs(c) for c in codes if c not in (0, -signal.SIGTERM)), default=0)
        return self.exit_code
