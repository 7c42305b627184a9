"""``twostage bench chaos``: a Jepsen-style fault campaign against a replicated cluster.

Ten hosts, each a process in its own network namespace (``twostage.bench.hosts``):
2 shards x 3 recall replicas (snapshots on a shared directory, each replica's
volume a small tmpfs), 2 rerank replicas and 2 gateways. While a writer sends
Upserts and Deletes through both gateways (retrying a failed one with the same
request_id) and a searcher sends searches at a steady rate, a nemesis injects
one fault at a time: kill -9 and restart a replica, partition it, pause it,
publish a new snapshot, restart a gateway, fill a replica's disk. At most one
replica of a shard is ever faulted, so a majority stays up.

Every write is recorded with its outcome: ``ok`` (acknowledged, with its
version) or ``fail`` / ``info`` (never acknowledged: possibly durable on some
replica, from where it spreads, so its effect is indeterminate). After healing,
the checker waits for the replicas of each shard to agree, reads every
replica's (id, version, deleted) rows (Recall.Digest, then Recall.Versions)
and the text of the documents the history pins down (Recall.Get), and counts
lost acknowledged writes, resurrected deletes, divergent and misplaced
documents (``check``, a pure function of the history and the states).
"""

import asyncio
import errno
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np

from twostage.errors import TwostageError
from twostage.sharding import shard_of

FAULTS = ("kill", "partition", "pause", "snapshot", "gateway_restart", "disk_full")
SHARDS = 2
REPLICAS = 3
RECALL_PORT, RERANK_PORT, GATEWAY_PORT = 50052, 50053, 50051
# Retries: codes that say the request itself is wrong, so resending cannot help.
FINAL_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.PERMISSION_DENIED,
               grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND}
VERSIONS_BUCKETS_PER_CALL = 128
GET_IDS_PER_CALL = 256
WORDS = ("amber", "basalt", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "indigo", "juniper", "kelp",
         "lichen", "meadow", "nickel", "orchid", "pumice", "quartz", "river", "saffron", "tundra", "umber", "valley",
         "willow", "xenon", "yarrow", "zephyr", "copper", "glacier", "heron", "lantern")


class ChaosError(TwostageError):
    """The campaign could not run, or its verdict failed; the message says why."""


@dataclass(frozen=True)
class ChaosSettings:
    rounds: int = 3  # of each fault type
    hold_s: float = 5.0  # how long a fault lasts
    gap_s: float = 2.0  # quiet time between faults
    corpus_docs: int = 300
    new_ids: int = 300  # ids beyond the corpus that the writer creates
    bulk_docs: int = 1000
    writers: int = 2  # concurrent write loops
    write_rate: float = 4.0  # writes per second, all loops together
    conflict_every: int = 8  # every Nth write is an upsert of one id through both gateways at once
    search_rate: float = 4.0
    search_budget_ms: int = 1000
    write_try_timeout_s: float = 8.0
    bulk_try_timeout_s: float = 120.0
    write_tries: int = 5
    write_deadline_s: float = 40.0  # all tries of one write together (bulk: 3x)
    converge_timeout_s: float = 60.0
    ready_timeout_s: float = 240.0  # first start: ten processes loading models on a small machine
    restart_timeout_s: float = 120.0
    volume_mib: int = 256
    seed: int = 1

    @classmethod
    def quick(cls, **overrides) -> "ChaosSettings":
        return cls(**({"rounds": 1, "hold_s": 2.0, "gap_s": 1.0, "corpus_docs": 200, "new_ids": 200,
                       "write_deadline_s": 30.0, "converge_timeout_s": 60.0} | overrides))


# -- the history ----------------------------------------------------------------------------------------------

Version = tuple[int, str]  # (clock, writer): bigger is newer
ZERO: Version = (0, "")


@dataclass
class Op:
    """One write as the client saw it (times: time.monotonic())."""
    kind: str  # "upsert" | "delete"
    ids: list[str]
    request_id: str
    gateway: int
    start: float
    texts: dict[str, str] = field(default_factory=dict)  # upsert: id -> text
    end: float = 0.0
    outcome: str = "pending"  # "ok" | "fail" (refused for good) | "info" (retries ran out); both indeterminate
    version: Version | None = None
    shards: list[dict] = field(default_factory=list)
    tries: int = 0
    error: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.outcome == "ok"


@dataclass
class SearchRecord:
    start: float
    latency_s: float
    failed: bool
    gateway: int
    error: str = ""


@dataclass
class Window:
    fault: str
    target: str
    start: float
    end: float = 0.0


# -- the checker ----------------------------------------------------------------------------------------------

Row = tuple[Version, bool]  # (version, deleted)
State = dict[str, Row]  # one replica: id -> row


def _could_be_newer(indeterminate: Op, acked: Op) -> bool:
    """A write takes its version while in flight; one that ended before the acknowledged write began is older."""
    return indeterminate.end >= acked.start


def newest_acknowledged(history: list[Op]) -> dict[str, Op]:
    """Per id, its acknowledged write of the highest version."""
    newest: dict[str, Op] = {}
    for op in history:
        if op.acknowledged:
            for doc_id in op.ids:
                if doc_id not in newest or op.version > newest[doc_id].version:
                    newest[doc_id] = op
    return newest


def pinned_writes(history: list[Op]) -> dict[str, Op]:
    """Per id, its newest acknowledged write when no indeterminate write of the id could be newer: the state
    every replica must hold for the id."""
    newest = newest_acknowledged(history)
    loose: dict[str, list[Op]] = {}
    for op in history:
        if not op.acknowledged:
            for doc_id in op.ids:
                loose.setdefault(doc_id, []).append(op)
    return {doc_id: op for doc_id, op in newest.items()
            if not any(_could_be_newer(other, op) for other in loose.get(doc_id, ()))}


def check(history: list[Op], states: dict[int, dict[str, State]], texts: dict[int, dict[str, dict[str, str]]],
          shards: int = SHARDS, sample: int = 20) -> dict:
    """The verdict from the history and every replica's state.

    ``states[shard][replica]``: id -> (version, deleted); ``texts[shard][replica]``: id -> text of the live
    documents among the pinned ids (``pinned_writes``). Counts:
    lost: acknowledged (write, id) pairs missing on a replica of the id's shard, or at an older version there,
      plus pinned ids whose replica state is not exactly the pinned write (its version, deleted or live with
      its text);
    resurrected: ids whose newest acknowledged write is a delete, untouched by any indeterminate write, yet
      live on some replica of any shard;
    divergent: ids on which the replicas of a shard disagree;
    misplaced: live documents on a shard that does not own them.
    """
    lost: set[tuple[str, str, str]] = set()  # (request_id, id, replica)
    examples: list[str] = []

    def lose(op: Op, doc_id: str, replica: str, why: str) -> None:
        if (op.request_id, doc_id, replica) not in lost:
            lost.add((op.request_id, doc_id, replica))
            if len(examples) < sample:
                examples.append(f"{op.kind} {doc_id} ({op.request_id}, version {op.version}) on {replica}: {why}")

    for op in history:
        if not op.acknowledged:
            continue
        for doc_id in op.ids:
            for replica, state in states.get(shard_of(doc_id, shards), {}).items():
                row = state.get(doc_id)
                if row is None:
                    lose(op, doc_id, replica, "missing")
                elif row[0] < op.version:
                    lose(op, doc_id, replica, f"at older version {row[0]}")
    pinned = pinned_writes(history)
    for doc_id, op in pinned.items():
        shard = shard_of(doc_id, shards)
        for replica, state in states.get(shard, {}).items():
            row = state.get(doc_id)
            if row is None or row[0] < op.version:
                continue  # counted above
            # A newer version than the acknowledged one can only be another try of the same request (nothing else
            # that touched the id could be newer): a resend through a gateway that had not seen the request id
            # stamps a version of its own. Its content must still be this write's.
            if row[1] != (op.kind == "delete"):
                lose(op, doc_id, replica, "deleted" if row[1] else "live after the delete")
            elif op.kind == "upsert" and texts.get(shard, {}).get(replica, {}).get(doc_id) != op.texts[doc_id]:
                lose(op, doc_id, replica, f"text {texts.get(shard, {}).get(replica, {}).get(doc_id)!r}"
                     + (f" at version {row[0]}" if row[0] != op.version else ""))

    touched_loosely = {doc_id for op in history if not op.acknowledged for doc_id in op.ids}
    deleted = {doc_id for doc_id, op in newest_acknowledged(history).items() if op.kind == "delete" and doc_id not in touched_loosely}
    resurrected = sorted({doc_id for replicas in states.values() for state in replicas.values()
                          for doc_id, (_, gone) in state.items() if doc_id in deleted and not gone})

    divergent: list[str] = []
    misplaced: list[str] = []
    for shard, replicas in states.items():
        ids = set().union(*replicas.values()) if replicas else set()
        divergent += sorted(i for i in ids if len({state.get(i) for state in replicas.values()}) > 1)
        misplaced += sorted({i for state in replicas.values() for i, (_, gone) in state.items()
                             if not gone and shard_of(i, shards) != shard})
    acked = [op for op in history if op.acknowledged]
    return {
        "acknowledged": len(acked),
        "acknowledged_documents": sum(len(op.ids) for op in acked),
        "indeterminate": sum(1 for op in history if op.outcome in ("fail", "info")),
        "pinned_ids": len(pinned),
        "lost": len(lost),
        "lost_examples": examples,
        "resurrected": len(resurrected),
        "resurrected_examples": resurrected[:sample],
        "divergent": len(divergent),
        "divergent_examples": divergent[:sample],
        "misplaced": len(misplaced),
        "misplaced_examples": misplaced[:sample],
    }


def search_stats(searches: list[SearchRecord], windows: list[Window]) -> dict[str, dict]:
    """Per fault type (``none`` outside every window): searches attributed by when they started."""
    groups: dict[str, list[SearchRecord]] = {}
    for search in searches:
        fault = next((w.fault for w in windows if w.start <= search.start < (w.end or float("inf"))), "none")
        groups.setdefault(fault, []).append(search)
    rounds = {fault: sum(1 for w in windows if w.fault == fault and w.end) for fault in FAULTS}
    report = {}
    for fault in (*FAULTS, "none"):
        group = groups.get(fault, [])
        latencies = [s.latency_s * 1000 for s in group]
        errors: dict[str, int] = {}
        for search in group:
            if search.failed:
                errors[search.error] = errors.get(search.error, 0) + 1
        report[fault] = {
            "searches": len(group),
            "search_failed_share": round(sum(s.failed for s in group) / len(group), 4) if group else None,
            "search_p99_ms": round(float(np.percentile(latencies, 99)), 1) if latencies else None,
            "search_errors": errors,
        } | ({"rounds": rounds[fault]} if fault in rounds else {})
    return report


# -- the cluster ----------------------------------------------------------------------------------------------

def make_corpus(path: Path, docs: int, rng: random.Random) -> list[str]:
    """Short made-up documents (cheap to embed on a small machine): doc-0 .. doc-(N-1)."""
    ids = [f"doc-{i}" for i in range(docs)]
    with path.open("w") as out:
        for doc_id in ids:
            words = " ".join(rng.choice(WORDS) for _ in range(6))
            out.write(json.dumps({"_id": doc_id, "title": f"note {doc_id}", "text": words}) + "\n")
    return ids


def optional_flags() -> tuple[list[str], list[str]]:
    """Settings the replicated write path may have (every settings field is a --flag): (recall, gateway)."""
    from gateway.config import GatewaySettings
    from recall_server.config import RecallSettings

    recall = ["--anti-entropy-period-s", "1"] if "anti_entropy_period_s" in RecallSettings.model_fields else []
    gateway = ["--write-quorum", "majority"] if "write_quorum" in GatewaySettings.model_fields else []
    return recall, gateway


class Cluster:
    """The ten hosts and what the nemesis needs to know about them."""

    def __init__(self, network, work: Path, settings: ChaosSettings, log):
        self.net = network
        self.work = work
        self.settings = settings
        self.log = log
        self.snapshot_dir = work / "snapshots"
        self.corpus = work / "corpus.jsonl"
        self.replicas: list[list] = []  # [shard][replica] -> Host
        self.rerankers: list = []
        self.gateways: list = []
        self.snapshot_versions = [1] * SHARDS

    async def build_snapshot(self, shard: int, version: int) -> None:
        argv = [sys.executable, "-m", "twostage", "index", "build", "--corpus", str(self.corpus),
                "--shards", str(SHARDS), "--shard-index", str(shard), "--snapshot-dir", str(self.snapshot_dir),
                "--version", f"v{version}"]
        process = await asyncio.create_subprocess_exec(*argv, cwd=self.net.cwd, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(process.communicate(), self.settings.ready_timeout_s)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise ChaosError(f"building snapshot v{version} of shard {shard} took over "
                             f"{self.settings.ready_timeout_s:.0f} s") from None
        if process.returncode != 0:
            raise ChaosError(f"building snapshot v{version} of shard {shard} failed:\n{out.decode()[-2000:]}")

    async def start(self, rng: random.Random) -> list[str]:
        corpus_ids = make_corpus(self.corpus, self.settings.corpus_docs, rng)
        await asyncio.gather(*(self.build_snapshot(shard, 1) for shard in range(SHARDS)))
        for shard in range(SHARDS):
            self.replicas.append([await self.net.add_host(f"r{shard}{'abc'[j]}", self.settings.volume_mib)
                                  for j in range(REPLICAS)])
        self.rerankers = [await self.net.add_host(f"k{i}") for i in range(2)]
        self.gateways = [await self.net.add_host(f"g{i}") for i in range(2)]
        recall_flags, gateway_flags = optional_flags()
        starts = []
        for shard, hosts in enumerate(self.replicas):
            peers = "|".join(f"{h.address}:{RECALL_PORT}" for h in hosts)
            for host in hosts:
                starts.append(self.net.start(
                    host, "recall_server", "--host", host.address, "--port", str(RECALL_PORT),
                    "--index-dir", str(host.volume / "index"), "--snapshot-dir", str(self.snapshot_dir),
                    "--shard", str(shard), "--peers", peers, "--peer-sync-period-s", "0.5",
                    "--snapshot-poll-s", "0.5", *recall_flags, service="recall",
                    ready_timeout_s=self.settings.ready_timeout_s))
        for host in self.rerankers:
            starts.append(self.net.start(host, "rerank_server", "--host", host.address, "--port", str(RERANK_PORT),
                                         service="rerank", ready_timeout_s=self.settings.ready_timeout_s))
        await asyncio.gather(*starts)
        recall_targets = ",".join("|".join(f"{h.address}:{RECALL_PORT}" for h in hosts) for hosts in self.replicas)
        rerank_targets = ",".join(f"{h.address}:{RERANK_PORT}" for h in self.rerankers)
        await asyncio.gather(*(self.net.start(
            host, "gateway", "--host", host.address, "--port", str(GATEWAY_PORT), "--recall-targets", recall_targets,
            "--rerank-targets", rerank_targets, *gateway_flags, service="gateway",
            ready_timeout_s=self.settings.ready_timeout_s) for host in self.gateways))
        return corpus_ids

    def gateway_targets(self) -> list[str]:
        return [f"{h.address}:{GATEWAY_PORT}" for h in self.gateways]


# -- the writer and the searcher ------------------------------------------------------------------------------

class Writer:
    def __init__(self, stubs, settings: ChaosSettings, rng: random.Random, corpus_ids: list[str]):
        self.stubs = stubs
        self.settings = settings
        self.rng = rng
        self.ids = corpus_ids + [f"doc-{len(corpus_ids) + i}" for i in range(settings.new_ids)]
        self.history: list[Op] = []
        self._serial = 0

    def _text(self, doc_id: str) -> str:
        self._serial += 1
        return f"{' '.join(self.rng.choice(WORDS) for _ in range(4))} w{self._serial}"

    def _upsert(self, ids: list[str], gateway: int) -> Op:
        return Op("upsert", ids, uuid.uuid4().hex, gateway, time.monotonic(), {i: self._text(i) for i in ids})

    async def send(self, op: Op, try_timeout_s: float, deadline_s: float) -> Op:
        """Send, resending with the same request_id on failure, a bounded number of times within a deadline."""
        from twostage.v1 import common_pb2

        self.history.append(op)
        if op.kind == "upsert":
            request = common_pb2.UpsertRequest(request_id=op.request_id, documents=[
                common_pb2.Document(id=i, title=f"note {i}", text=op.texts[i]) for i in op.ids])
        else:
            request = common_pb2.DeleteRequest(request_id=op.request_id, ids=op.ids)
        deadline = op.start + deadline_s
        backoff = 0.25
        while op.tries < self.settings.write_tries:
            op.tries += 1
            timeout = min(try_timeout_s, deadline - time.monotonic())
            if timeout <= 0:
                break
            stub = self.stubs[op.gateway]
            try:
                reply = await (stub.Upsert if op.kind == "upsert" else stub.Delete)(request, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                op.error = f"{error.code().name}: {error.details()}"
                if error.code() in FINAL_CODES:
                    op.outcome = "fail"
                    break
                # The other gateway may be the one still up; the request_id names the write on both.
                op.gateway = 1 - op.gateway
                pause = min(backoff, deadline - time.monotonic())
                if pause > 0:
                    await asyncio.sleep(pause)  # backoff between tries
                backoff = min(backoff * 2, 2.0)
                continue
            op.outcome = "ok"
            op.version = (reply.version.clock, reply.version.writer)
            op.shards = [{"shard": s.shard, "documents": s.documents, "acknowledged": s.acknowledged,
                          "replicas": s.replicas} for s in reply.shards]
            break
        if op.outcome == "pending":
            op.outcome = "info"
        op.end = time.monotonic()
        return op

    async def bulk(self) -> Op:
        base = len(self.ids)
        op = self._upsert([f"doc-{base + i}" for i in range(self.settings.bulk_docs)], self.rng.randrange(2))
        return await self.send(op, self.settings.bulk_try_timeout_s, 3 * self.settings.write_deadline_s)

    async def conflict(self) -> None:
        """One id through both gateways at once, with different texts."""
        doc_id = self.rng.choice(self.ids)
        ops = [self._upsert([doc_id], gateway) for gateway in (0, 1)]
        await asyncio.gather(*(self.send(op, self.settings.write_try_timeout_s, self.settings.write_deadline_s)
                               for op in ops))

    async def one(self) -> None:
        gateway = self.rng.randrange(2)
        ids = self.rng.sample(self.ids, self.rng.randint(1, 4))
        if self.rng.random() < 0.3:
            op = Op("delete", ids, uuid.uuid4().hex, gateway, time.monotonic())
        else:
            op = self._upsert(ids, gateway)
        await self.send(op, self.settings.write_try_timeout_s, self.settings.write_deadline_s)

    async def loop(self, stop: asyncio.Event, loop_index: int) -> None:
        period = self.settings.writers / self.settings.write_rate
        step = 0
        while not stop.is_set():
            step += 1
            started = time.monotonic()
            if loop_index == 0 and step % self.settings.conflict_every == 0:
                await self.conflict()
            else:
                await self.one()
            pause = period - (time.monotonic() - started)
            if pause > 0:
                await _wait_or_stop(stop, pause)  # a steady write rate


async def _wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


async def search_loop(stubs, settings: ChaosSettings, rng: random.Random, stop: asyncio.Event,
                      records: list[SearchRecord], max_in_flight: int = 16) -> None:
    """Searches at a steady rate through both gateways, each recorded with its start and latency."""
    from twostage.v1 import gateway_pb2

    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task] = set()

    async def one(gateway: int) -> None:
        request = gateway_pb2.SearchRequest(query=" ".join(rng.choice(WORDS) for _ in range(2)), top_k=5,
                                            recall_k=10, budget_ms=settings.search_budget_ms)
        start = time.monotonic()
        try:
            try:
                await stubs[gateway].Search(request, timeout=settings.search_budget_ms / 1000 + 2)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                # A gateway that is down refuses at once; the client's balancer sends the search to the other one,
                # with what is left of the budget.
                gateway = 1 - gateway
                left_ms = settings.search_budget_ms - 1000 * (time.monotonic() - start)
                if left_ms < 1:
                    raise
                request.budget_ms = int(left_ms)
                await stubs[gateway].Search(request, timeout=left_ms / 1000 + 2)
            records.append(SearchRecord(start, time.monotonic() - start, False, gateway))
        except grpc.aio.AioRpcError as error:
            detail = (error.details() or "")[:60]
            records.append(SearchRecord(start, time.monotonic() - start, True, gateway,
                                        f"{error.code().name}: {detail}"))
        finally:
            slots.release()

    n = 0
    while not stop.is_set():
        await slots.acquire()
        task = asyncio.ensure_future(one(n % 2))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        await _wait_or_stop(stop, 1 / settings.search_rate)  # a steady search rate
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the nemesis ----------------------------------------------------------------------------------------------

def fill_disk(directory: Path, limit_mib: int) -> int:
    """Write a file until the volume is full (ENOSPC); bounded by the volume's size. Returns MiB written."""
    chunk = b"\0" * (1 << 20)
    written = 0
    with open(directory / "fill", "wb") as out:
        while written <= limit_mib + 1:
            try:
                out.write(chunk)
                out.flush()
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                break
            written += 1
    return written


class Nemesis:
    def __init__(self, cluster: Cluster, settings: ChaosSettings, rng: random.Random):
        self.cluster = cluster
        self.net = cluster.net
        self.settings = settings
        self.rng = rng
        self.windows: list[Window] = []
        self._turn = 0

    def _next_replica(self):
        """Replicas in turn over both shards; one fault at a time, so never two replicas of a shard at once."""
        order = [hosts[j] for j in range(REPLICAS) for hosts in self.cluster.replicas]
        host = order[self._turn % len(order)]
        self._turn += 1
        return host

    async def run(self) -> None:
        for _ in range(self.settings.rounds):
            for fault in FAULTS:
                await getattr(self, fault)()
                await asyncio.sleep(self.settings.gap_s)  # quiet time between faults: searches count as 'none'

    def _open(self, fault: str, target: str) -> Window:
        window = Window(fault, target, time.monotonic())
        self.windows.append(window)
        self.cluster.log(f"  {fault} {target}")
        return window

    async def _hold(self) -> None:
        await asyncio.sleep(self.settings.hold_s)  # the fault's duration

    async def _fault(self, fault: str, target: str, inject, heal) -> None:
        """Inject, hold for the fault's duration, heal (also when the hold is interrupted); the window is recorded."""
        window = self._open(fault, target)
        await inject()
        try:
            await self._hold()
        finally:
            await heal()
        window.end = time.monotonic()

    async def kill(self) -> None:
        host = self._next_replica()
        await self._fault("kill", host.name, lambda: self.net.kill(host),
                          lambda: self.net.restart(host, self.settings.restart_timeout_s))

    async def partition(self) -> None:
        host = self._next_replica()
        await self._fault("partition", host.name, lambda: self.net.partition(host), lambda: self.net.heal(host))

    async def pause(self) -> None:
        host = self._next_replica()
        await self._fault("pause", host.name, lambda: asyncio.to_thread(host.signal, signal.SIGSTOP),
                          lambda: asyncio.to_thread(host.signal, signal.SIGCONT))

    async def snapshot(self) -> None:
        shard = self.rng.randrange(SHARDS)
        self.cluster.snapshot_versions[shard] += 1
        version = self.cluster.snapshot_versions[shard]
        window = self._open("snapshot", f"shard-{shard} v{version}")
        await self.cluster.build_snapshot(shard, version)
        await self._hold()  # the replicas switch while writes go on
        window.end = time.monotonic()

    async def gateway_restart(self) -> None:
        host = self.cluster.gateways[self.rng.randrange(2)]
        await self._fault("gateway_restart", host.name, lambda: self.net.stop(host),
                          lambda: self.net.restart(host, self.settings.restart_timeout_s))

    async def disk_full(self) -> None:
        host = self._next_replica()
        await self._fault("disk_full", host.name,
                          lambda: asyncio.to_thread(fill_disk, host.volume, self.settings.volume_mib),
                          lambda: asyncio.to_thread((host.volume / "fill").unlink, True))

    async def heal_all(self) -> None:
        """After the campaign: every link up, nothing paused, the disks emptied, every process running."""
        for host in list(self.net.hosts.values()):
            await self.net.heal(host)
            host.signal(signal.SIGCONT)
            if host.volume is not None:
                await asyncio.to_thread((host.volume / "fill").unlink, True)
            if not host.alive:
                await self.net.restart(host, self.settings.restart_timeout_s)


# -- reading the replicas -------------------------------------------------------------------------------------

async def read_state(stub, timeout_s: float = 10.0) -> tuple[str, State]:
    """A replica's rows, all buckets: (snapshot version, id -> (version, deleted))."""
    from twostage.v1 import recall_pb2

    digest = await stub.Digest(recall_pb2.DigestRequest(snapshot_version=""), timeout=timeout_s)
    state: State = {}
    for first in range(0, digest.buckets, VERSIONS_BUCKETS_PER_CALL):
        buckets = list(range(first, min(first + VERSIONS_BUCKETS_PER_CALL, digest.buckets)))
        reply = await stub.Versions(recall_pb2.VersionsRequest(snapshot_version=digest.snapshot_version,
                                                               buckets=buckets), timeout=timeout_s)
        for row in reply.versions:
            state[row.id] = ((row.version.clock, row.version.writer), row.deleted)
    return digest.snapshot_version, state


async def read_texts(stub, ids: list[str], timeout_s: float = 10.0) -> dict[str, str]:
    from twostage.v1 import common_pb2

    texts = {}
    for first in range(0, len(ids), GET_IDS_PER_CALL):
        reply = await stub.Get(common_pb2.GetRequest(ids=ids[first:first + GET_IDS_PER_CALL]), timeout=timeout_s)
        texts |= {doc.id: doc.text for doc in reply.documents}
    return texts


async def converge(stubs: dict[int, dict[str, object]], timeout_s: float, healed_at: float) -> dict:
    """Poll every replica until the replicas of each shard hold identical rows, or the timeout.
    Returns the last states, each shard's time to agreement (from ``healed_at``) and read errors."""
    deadline = time.monotonic() + timeout_s
    agreed: dict[int, float] = {}
    states: dict[int, dict[str, State]] = {}
    snapshots: dict[str, str] = {}
    errors: dict[str, str] = {}
    while True:
        errors = {}
        for shard, replicas in stubs.items():
            for name, stub in replicas.items():
                try:
                    snapshots[name], states.setdefault(shard, {})[name] = await read_state(stub)
                except grpc.aio.AioRpcError as error:
                    errors[name] = f"{error.code().name}: {error.details()}"
                    if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                        # Waiting cannot help: this server has no Digest/Versions, so nothing can be checked.
                        errors[name] += " (the checker reads every replica's versions through Digest/Versions)"
                        return {"states": {}, "agreed_s": {}, "snapshots": snapshots, "errors": errors}
            if not errors and shard not in agreed and len({frozenset(s.items()) for s in states[shard].values()}) == 1:
                agreed[shard] = time.monotonic() - healed_at
        if len(agreed) == len(stubs) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.25)  # polling for agreement
    return {"states": states, "agreed_s": agreed, "snapshots": snapshots, "errors": errors}


# -- the campaign ---------------------------------------------------------------------------------------------

async def run_campaign(settings: ChaosSettings, log=print) -> dict:
    """Set up the hosts, run the writer, searcher and nemesis, heal, check; always removes what it made."""
    from twostage.bench.hosts import Network
    from twostage.connect import PLAINTEXT
    from twostage.v1 import gateway_pb2_grpc, recall_pb2_grpc

    rng = random.Random(settings.seed)
    network = Network(prefix="ts-", cwd=Path(__file__).resolve().parents[2])
    work = None
    channels = []
    started = time.monotonic()
    try:
        await network.create()  # first removes what an earlier run left, temp dirs included
        work = Path(tempfile.mkdtemp(prefix="ts-chaos-"))
        cluster = Cluster(network, work, settings, log)
        log(f"starting 10 hosts on {network.bridge} ...")
        corpus_ids = await cluster.start(rng)
        setup_s = time.monotonic() - started
        log(f"serving after {setup_s:.0f} s; faults: {', '.join(FAULTS)} x {settings.rounds}")
        channels = [PLAINTEXT.aio_channel(t) for t in cluster.gateway_targets()]
        stubs = [gateway_pb2_grpc.GatewayStub(c) for c in channels]
        writer = Writer(stubs, settings, rng, corpus_ids)
        nemesis = Nemesis(cluster, settings, rng)
        stop = asyncio.Event()
        searches: list[SearchRecord] = []
        loops = [asyncio.ensure_future(writer.loop(stop, i)) for i in range(settings.writers)]
        searcher = asyncio.ensure_future(search_loop(stubs, settings, rng, stop, searches))
        bulk = asyncio.ensure_future(writer.bulk())
        try:
            await nemesis.run()
        finally:
            stop.set()
            await nemesis.heal_all()
            outcomes = await asyncio.gather(*loops, searcher, bulk, return_exceptions=True)
        if crashed := [o for o in outcomes if isinstance(o, Exception)]:
            raise ChaosError(f"the writer or searcher crashed: {crashed[0]!r}") from crashed[0]
        healed_at = time.monotonic()
        log(f"healed; {len(writer.history)} writes, {len(searches)} searches; waiting for the replicas to agree ...")

        recall_channels = {h.name: PLAINTEXT.aio_channel(f"{h.address}:{RECALL_PORT}")
                           for hosts in cluster.replicas for h in hosts}
        channels += list(recall_channels.values())
        recall_stubs = {shard: {h.name: recall_pb2_grpc.RecallStub(recall_channels[h.name]) for h in hosts}
                        for shard, hosts in enumerate(cluster.replicas)}
        agreement = await converge(recall_stubs, settings.converge_timeout_s, healed_at)
        pinned = pinned_writes(writer.history)
        texts: dict[int, dict[str, dict[str, str]]] = {}
        for shard, replicas in recall_stubs.items():
            ids = sorted(i for i, op in pinned.items() if op.kind == "upsert" and shard_of(i, SHARDS) == shard)
            for name, stub in replicas.items():
                texts.setdefault(shard, {})[name] = await read_texts(stub, ids)
        verdict = check(writer.history, agreement["states"], texts)
        bulk_op = bulk.result()
        report = {
            "machine": _machine(),
            "settings": asdict(settings),
            "topology": {"shards": SHARDS, "replicas_per_shard": REPLICAS, "gateways": 2, "rerankers": 2,
                         "optional_flags": dict(zip(("recall", "gateway"), optional_flags()))},
            **verdict,
            "converge_s": (round(max(agreement["agreed_s"].values()), 3)
                           if len(agreement["agreed_s"]) == SHARDS else None),
            "converge_s_per_shard": {str(k): round(v, 3) for k, v in sorted(agreement["agreed_s"].items())},
            "read_errors": agreement["errors"],
            "snapshots_served": agreement["snapshots"],
            "bulk": {"documents": len(bulk_op.ids), "outcome": bulk_op.outcome,
                     "latency_s": round(bulk_op.end - bulk_op.start, 2), "tries": bulk_op.tries,
                     "error": bulk_op.error},
            "writes": _write_summary(writer.history),
            "faults": search_stats(searches, nemesis.windows),
            "windows": [{"fault": w.fault, "target": w.target, "start_s": round(w.start - started, 2),
                         "duration_s": round(w.end - w.start, 2)} for w in nemesis.windows],
            "setup_s": round(setup_s, 1),
            "duration_s": round(time.monotonic() - started, 1),
        }
        report["passed"] = passed(report)
        return report
    finally:
        await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
        await network.remove()
        if work is not None:
            await asyncio.to_thread(_remove_tree, work)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _machine() -> dict:
    from twostage.bench.report import machine

    return machine() | {"kernel": os.uname().release, "memory_gib": round(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def _write_summary(history: list[Op]) -> dict:
    outcomes: dict[str, int] = {}
    for op in history:
        outcomes[f"{op.kind}_{op.outcome}"] = outcomes.get(f"{op.kind}_{op.outcome}", 0) + 1
    latencies = [op.end - op.start for op in history if op.acknowledged]
    return {"ops": len(history), "outcomes": outcomes, "retried": sum(op.tries > 1 for op in history),
            "ack_p99_ms": round(float(np.percentile(latencies, 99)) * 1000, 1) if latencies else None,
            "errors": sorted({op.error.split(":")[0] for op in history if op.error})}


def passed(report: dict) -> bool:
    return (report["lost"] == 0 and report["divergent"] == 0 and report["misplaced"] == 0
            and report["resurrected"] == 0 and report["acknowledged"] > 0 and report["bulk"]["outcome"] == "ok"
            and report["converge_s"] is not None and not report["read_errors"]
            and all(report["faults"][f]["rounds"] >= 1 for f in FAULTS))


async def run(args) -> dict:
    from twostage.bench.report import write_json
    from twostage.model_store import fetch_defaults

    fetch_defaults(log=lambda message: None)
    overrides = {k: v for k, v in (("rounds", args.rounds), ("hold_s", args.hold_s), ("seed", args.seed))
                 if v is not None}
    settings = ChaosSettings.quick(**overrides) if args.quick else ChaosSettings(**overrides)
    report = await run_campaign(settings)
    summary = {k: report[k] for k in ("acknowledged", "indeterminate", "lost", "resurrected", "divergent",
                                      "misplaced", "converge_s", "passed")}
    print(json.dumps(summary | {"faults": report["faults"]}, indent=2))
    write_json(args.json, report)
    if not report["passed"]:
        raise ChaosError("the campaign's verdict failed: " + ", ".join(
            f"{k}={report[k]}" for k in ("lost", "resurrected", "divergent", "misplaced", "converge_s")))
    return report
