"""Rolling restarts under load: every rerank replica, then every recall replica of a shard
with two replicas, restarted one at a time while the load tester runs. No request fails."""

import asyncio
import os
import shutil
import signal
import sys

import pytest

from gateway.config import GatewaySettings
from gateway.servicer import build_server as build_gateway
from twostage.evaluation.loadtest import run_load

pytestmark = pytest.mark.slow
QUERIES = ["vitamin B12 deficiency", "folic acid and homocysteine", "tuberculosis treatment", "obesity and diabetes"]


class Process:
    """A stage as a child process, restartable on the same port."""

    def __init__(self, module: str, port: int, *flags: str):
        self.args = [sys.executable, "-m", module, "--port", str(port), "--drain-delay-s", "1", *flags]
        self.name = module.split("_")[0]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        while line := await self.process.stdout.readline():
            if line.decode().startswith(f"{self.name} serving on port"):
                asyncio.ensure_future(self._drain_output())
                return
        pytest.fail(f"{self.args} exited before serving")

    async def _drain_output(self) -> None:
        while await self.process.stdout.readline():
            pass

    async def restart(self) -> None:
        """SIGTERM (NOT_SERVING, drain delay, grace), wait for the exit, start again."""
        self.process.send_signal(signal.SIGTERM)
        assert await self.process.wait() == 0
        await self.start()

    async def stop(self) -> None:
        if self.process and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            await self.process.wait()


async def test_rolling_restarts_under_load_fail_no_request(built_index, tmp_path):
    from tests.system.test_cli import free_port_run

    base = free_port_run(4)
    copies = []
    for replica in range(2):  # two replicas of one shard: each its own copy of the index
        copies.append(tmp_path / f"replica-{replica}")
        shutil.copytree(built_index, copies[-1])
    recall = [Process("recall_server", base + i, "--index-dir", str(copies[i])) for i in range(2)]
    rerank = [Process("rerank_server", base + 2 + i) for i in range(2)]
    await asyncio.gather(*(p.start() for p in [*recall, *rerank]))
    gateway = build_gateway(GatewaySettings(
        port=0, recall_targets=f"127.0.0.1:{base}|127.0.0.1:{base + 1}",
        rerank_targets=f"127.0.0.1:{base + 2},127.0.0.1:{base + 3}", health_check_period_s=0.2,
    ))
    target = f"127.0.0.1:{await gateway.start()}"
    try:
        done = asyncio.Event()
        load = asyncio.ensure_future(run_load(target, "gateway", QUERIES, 3.0, 300.0, 10_000, recall_k=4,
                                              budget_ms=30_000, timeout_s=60, progress=False, stop=done))
        await asyncio.sleep(1)
        for process in [*rerank, *recall]:
            await process.restart()
            await asyncio.sleep(1)  # traffic flows through the restarted one before the next goes
        done.set()
        report = (await load).report()
    finally:
        await gateway.stop(grace_s=1)
        await asyncio.gather(*(p.stop() for p in [*recall, *rerank]))
    print(f"\nrolling restarts: {report['requests']} requests, errors {report['errors']}, degraded {report['degraded']}")
    assert report["requests"] > 20 and report["errors"] == {}
    assert report["ok"] == report["requests"]
