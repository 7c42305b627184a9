"""``twostage serve recall|rerank|gateway|all``."""

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from twostage.config import add_settings_flags, settings_from_args
from twostage.probe import wait_serving
from twostage.server import install_stop_signals, serve_until_signal


def register(commands) -> None:
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings
    from rerank_server.config import RerankSettings

    parser = commands.add_parser("serve", help="run a service in the foreground until SIGTERM or Ctrl-C")
    services = parser.add_subparsers(dest="service", required=True)
    for name, settings_cls, run in (
        ("recall", RecallSettings, _serve_recall),
        ("rerank", RerankSettings, _serve_rerank),
        ("gateway", GatewaySettings, _serve_gateway),
    ):
        sub = services.add_parser(name, help=f"the {name} server")
        add_settings_flags(sub, settings_cls)
        sub.set_defaults(run=run, settings_cls=settings_cls)
    stack = services.add_parser("all", help="recall, rerank and gateway as separate processes")
    add_stack_flags(stack)
    stack.set_defaults(run=lambda args: asyncio.run(run_stack(args)))


def add_stack_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="gateway port; recall and rerank take the next ones")
    parser.add_argument("--index-dir", default=None, help="recall index (default: the demo index)")
    parser.add_argument("--recall-shards", type=int, default=1,
                        help="recall processes, one per index shard (INDEX_DIR/shard-i, from 'index build --shards')")
    parser.add_argument("--rerank-replicas", type=int, default=1, help="rerank processes, each on its own port")
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)


def _announce(name: str):
    return lambda port: print(f"{name} serving on port {port}", flush=True)


def _serve_recall(args) -> None:
    from recall_server.service import RecallService
    from recall_server.servicer import build_server

    settings = settings_from_args(args.settings_cls, args)
    asyncio.run(serve_until_signal(lambda: build_server(RecallService(settings)), _announce("recall")))


def _serve_rerank(args) -> None:
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server

    settings = settings_from_args(args.settings_cls, args)
    asyncio.run(serve_until_signal(lambda: build_server(RerankService(settings)), _announce("rerank")))


def _serve_gateway(args) -> None:
    from gateway.servicer import build_server

    settings = settings_from_args(args.settings_cls, args)
    asyncio.run(serve_until_signal(lambda: build_server(settings), _announce("gateway")))


class Stack:
    """The three tiers as child processes, started in order and stopped together."""

    def __init__(self, host: str, port: int, index_dir: str | None, rerank_replicas: int = 1, recall_shards: int = 1):
        self.host = host
        self.gateway_target = f"{host}:{port}"
        self.recall_targets = [f"{host}:{port + 1 + i}" for i in range(recall_shards)]
        self.rerank_targets = [f"{host}:{port + 1 + recall_shards + i}" for i in range(rerank_replicas)]
        self.index_dirs: list[str | None] = [index_dir]
        if recall_shards > 1:
            from recall_server.build import shard_dirs

            if index_dir is None:
                raise ValueError("--recall-shards needs --index-dir with shard-0 .. shard-N subdirectories")
            self.index_dirs = [str(d) for d in shard_dirs(Path(index_dir), recall_shards)]
            if missing := [d for d in self.index_dirs if not Path(d).is_dir()]:
                raise FileNotFoundError(f"missing shard {missing[0]}; build with 'twostage index build --shards N'")
        self.processes: list[asyncio.subprocess.Process] = []

    async def _spawn(self, module: str, target: str, *flags: str) -> None:
        port = target.rsplit(":", 1)[1]
        self.processes.append(
            await asyncio.create_subprocess_exec(sys.executable, "-m", module, "--host", self.host, "--port", port, *flags)
        )

    def alive(self) -> bool:
        return all(p.returncode is None for p in self.processes)

    async def start(self, ready_timeout_s: float) -> None:
        for target, index_dir in zip(self.recall_targets, self.index_dirs):
            await self._spawn("recall_server", target, *(["--index-dir", index_dir] if index_dir else []))
        for target in self.rerank_targets:
            await self._spawn("rerank_server", target)
        await self._spawn(
            "gateway",
            self.gateway_target,
            "--recall-targets", ",".join(self.recall_targets),
            "--rerank-targets", ",".join(self.rerank_targets),
        )
        targets = [self.gateway_target, *self.recall_targets, *self.rerank_targets]
        await wait_serving(targets, ready_timeout_s, self.alive)

    async def wait_any_exit(self) -> None:
        await asyncio.wait([asyncio.create_task(p.wait()) for p in self.processes], return_when=asyncio.FIRST_COMPLETED)

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM the gateway first (no new searches), then the stages; kill stragglers."""
        for process in self.processes[::-1]:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for process in self.processes:
            try:
                codes.append(await asyncio.wait_for(process.wait(), timeout_s))
            except TimeoutError:
                process.kill()
                codes.append(await process.wait())
        return max((abs(c) for c in codes if c not in (0, -signal.SIGTERM)), default=0)


async def run_stack(args, then=None) -> int:
    """Run the stack until a signal or a child's exit; ``then(stack)`` runs once it is ready
    (with ``args.once`` the stack stops after it)."""
    stack = Stack(args.host, args.port, args.index_dir, args.rerank_replicas, args.recall_shards)
    stop = asyncio.Event()
    install_stop_signals(stop)
    try:
        await stack.start(args.ready_timeout_s)
        print(f"twostage is serving: gateway {stack.gateway_target}, recall {', '.join(stack.recall_targets)}, "
              f"rerank {', '.join(stack.rerank_targets)}", flush=True)
        if then is not None:
            await then(stack)
        if not getattr(args, "once", False):
            print("press Ctrl-C to stop", flush=True)
            await asyncio.wait(
                [asyncio.create_task(stop.wait()), asyncio.create_task(stack.wait_any_exit())],
                return_when=asyncio.FIRST_COMPLETED,
            )
    finally:
        code = await stack.stop()
    return code
