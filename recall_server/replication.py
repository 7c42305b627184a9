"""Replication: what acknowledging a write means, and how the replicas of a shard converge.

The write contract:

- **Versioned.** Every write carries one version (``twostage.versions``, a hybrid logical clock reading
  and its writer's id), taken where it enters: the gateway, or a recall server written to directly. Every
  replica stores a write at that version.
- **Acknowledged = durable on a quorum.** The gateway sends a shard's part of a write to every replica of
  the shard and acknowledges it once ``write_quorum`` of them (``majority``, ``all`` or ``one``, counted
  against the replicas the shard is meant to have) have committed it to disk: a replica answers only
  after its SQLite commit (``recall_server.docstore``, synchronous=FULL). Quorums are counted in
  ``gateway.recall_tier``; the client's side of the contract (validation, request ids, partial
  failures) is stated in ``gateway.writes``. Under ``majority`` an acknowledged write survives the loss
  of any minority of the shard's replicas; under ``one`` it is lost with that replica's disk. A write
  short of its quorum may still take effect: the replicas that took it spread it (catch-up).
- **Last writer wins, by version.** A replica keeps, per id, only the newest version it has seen
  (``DocStore.apply``), so copying writes between replicas is safe in any order and any number of
  times: a copy never replaces a newer write, and a copy that is not newer is a no-op (so copies cannot
  bounce between replicas). A delete is a versioned tombstone.
- **Catch-up from peers** (no hints are kept: a replica that missed a write pulls it). Each replica reads,
  from every other replica serving the same snapshot, the rows written there since that snapshot
  (``Recall.Changes``) and applies them. Every stored row has a sequence of its own, so the last
  (sequence, key) received is an exact cursor: paging never skips a row. A cursor is kept per peer
  process and starts over when another process answers.
- **Anti-entropy by digests.** Every ``anti_entropy_period_s`` a replica compares, with each peer, a
  digest of (id, version, deleted) per bucket of ids (``Recall.Digest``), lists the versions in the
  buckets that differ (``Recall.Versions``) and pulls the documents the peer holds newer (``Changes``
  by id). This repairs what catch-up cannot see: a lost cursor, a restored disk, a write that reached
  only some replicas. The time since every peer last agreed is
  ``twostage_replica_agreement_age_seconds``.
- **Tombstones** are kept for ``tombstone_ttl_s`` (and at least until a snapshot newer than the delete
  is served), then purged, but only by a replica whose peers all answered and hold exactly its rows
  older than the purge horizon (a digest of those rows alone, so writes being made now never hold a
  purge back): a replica that may lack writes never takes absence as deletion. An id absent from a
  store is taken as deleted at its purge horizon, so a stale copy of it is never pulled; and a replica
  that holds an id live, older than a peer's purge horizon, which that peer lacks, deletes it (the peer
  deleted it so long ago that the tombstone is gone).
- **Reads** go to one replica and may trail the newest acknowledged write by a catch-up period.
- A round that fails (a peer away, a broken reply, a full disk) is logged, counted in
  ``twostage_peer_sync_failures_total`` and retried on the next round; the loop never ends while the
  server runs.

``PeerSync`` runs the pulling side. Its collaborators are typed interfaces: the store this replica serves
(``LocalReplica``: what it reads and applies locally, answered by the recall service) and the addresses
of the other replicas (``PeerDirectory``).
"""

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import grpc
import numpy as np
import prometheus_client as prom

from recall_server.config import RecallSettings
from recall_server.docstore import Write
from twostage.connect import ReloadingCredentials, RotatingChannel
from twostage.convert import document_from_proto, version_from_proto
from twostage.corpus import Document
from twostage.membership import Target
from twostage.v1 import recall_pb2, recall_pb2_grpc
from twostage.versions import Version, clock_at

log = logging.getLogger(__name__)
PAGE = 512  # changes per Changes reply
BUCKETS_PER_CALL = 16  # buckets per Versions call: about 10,000 documents each on a 10-million-document shard
CHANGES_MAX_BYTES = 4 << 20  # one Changes reply, well inside the default 16 MiB message limit
MAX_BUCKETS_PER_CALL = 128  # buckets one Versions call may ask for

REPAIRED = prom.Counter("twostage_replica_repaired_total", "Writes copied from other replicas of the shard", ["how"])
FAILURES = prom.Counter("twostage_peer_sync_failures_total", "Catch-up or anti-entropy calls to a peer that failed",
                        ["step"])
AGREEMENT_AGE = prom.Gauge("twostage_replica_agreement_age_seconds",
                           "Seconds since every other replica of the shard last had the same digest as this one")

BucketDigests = dict[int, tuple[int, int]]  # bucket -> (rows, sum of row hashes mod 2^64)


class ChangesPage(NamedTuple):
    """One Changes reply: rows in order, the answering process, and whether more follow the last one."""

    writes: list[Write]
    replica_id: str
    more: bool


class Digests(NamedTuple):
    buckets: BucketDigests
    snapshot_version: str  # the snapshot they are of
    purge_horizon: int  # the clock below which absent ids count as deleted (0: none)


class ReconcilePlan(NamedTuple):
    pull: list[str]  # ids the peer holds newer
    purged: list[str]  # ids held live here that the peer purged as deleted: tombstone them


class PeerCursor(NamedTuple):
    """How far catch-up has read from one peer address."""

    replica_id: str  # the process that answered there
    snapshot_version: str  # the snapshot both served
    after: tuple[int, int]  # (sequence, key) of the last change applied


class LocalReplica(Protocol):
    """The store this replica serves, as replication reads and writes it (the recall service answers)."""

    @property
    def replica_id(self) -> str: ...  # this process, as its peers see it

    def served_snapshot_version(self) -> str | None: ...  # None: no snapshot served (yet)

    async def apply_peer_writes(self, writes: list[Write], snapshot_version: str = "") -> int: ...

    async def digests(self, snapshot_version: str = "", below_clock: int = 0) -> Digests: ...

    async def reconcile_plan(self, snapshot_version: str, listed: list[tuple[str, Version]], buckets: list[int],
                             peer_horizon: int) -> ReconcilePlan: ...

    def tombstones_purgeable(self) -> Version: ...

    async def purge_tombstones(self, horizon: Version | None = None) -> int: ...


class PeerDirectory(Protocol):
    """Where the other replicas of the shard are (``twostage.membership.Target``)."""

    async def resolve(self) -> list[str]: ...


def tombstone_horizon(ttl_s: float, now_s: float | None = None) -> Version:
    """Tombstones older than this are purged. Rounded down, so replicas pick the same point and their digests
    (which leave such tombstones out) agree between purges."""
    step = min(3600.0, ttl_s / 4)
    point = (time.time() if now_s is None else now_s) - ttl_s
    return Version(clock_at(point - point % step), "")


def _change_bytes(write: Write) -> int:
    doc = write.doc
    return 64 + len(doc.id) + len(doc.title) + len(doc.text) + len(json.dumps(doc.metadata)) + (
        0 if write.vector is None else write.vector.nbytes)


def bounded_page(rows: Iterable[Write]) -> tuple[list[Write], bool]:
    """The leading rows that fit in one Changes reply (at least one), and whether some were cut off."""
    kept, size = [], 0
    for row in rows:
        size += _change_bytes(row)
        if kept and size > CHANGES_MAX_BYTES:
            return kept, True
        kept.append(row)
    return kept, False


def plan_reconcile(held: dict[str, tuple[Version, bool]], absent: Version | None,
                   listed: list[tuple[str, Version]], peer_horizon: int) -> ReconcilePlan:
    """Against a peer's versions in some buckets, given this store's rows there (id -> (version, deleted)) and
    its purge horizon (``absent``: an id absent here counts as deleted at it): the ids to pull (held newer
    there), and the ids held live here that the peer lacks, older than its horizon (deleted there long ago)."""
    pull = []
    for doc_id, version in listed:
        ours = held[doc_id][0] if doc_id in held else absent
        if ours is None or version > ours:
            pull.append(doc_id)
    theirs = {doc_id for doc_id, _ in listed}
    purged = [doc_id for doc_id, (version, deleted) in held.items()
              if not deleted and doc_id not in theirs and version.clock < peer_horizon]
    return ReconcilePlan(pull, purged)


def write_from_proto(change: recall_pb2.DocumentChange) -> Write:
    vector = None if change.deleted else np.frombuffer(change.vector, "<f4").astype(np.float32)
    doc = Document(change.document.id, "", "") if change.deleted else document_from_proto(change.document)
    return Write(doc, vector, version_from_proto(change.version), change.seq, change.key)


class PeerSync:
    """Pulls, from the other replicas of the shard, what ``local`` lacks (catch-up, anti-entropy) and purges
    tombstones once every peer agrees. ``peers`` defaults to the addresses ``settings.peers`` names."""

    def __init__(self, settings: RecallSettings, local: LocalReplica, peers: PeerDirectory | None = None):
        self.settings = settings
        self.local = local
        self.target: PeerDirectory = peers if peers is not None else Target(settings.peers)
        # Certificates and the peer token are re-read when they change; channels follow (RotatingChannel).
        self.credentials = ReloadingCredentials(settings.tls_dir, settings.peer_token_file,
                                                settings.peer_tls_server_name).load()
        self._stop = asyncio.Event()
        self._watch: asyncio.Task | None = None
        self._channels: dict[str, RotatingChannel] = {}
        self._cursors: dict[str, PeerCursor] = {}  # per peer address
        self._task: asyncio.Task | None = None
        self._started = time.time()
        self.last_agreement: float | None = None  # wall-clock time every peer last agreed
        self.last_error = ""
        self._disagreed = False  # some peer's digest differed in this anti-entropy round
        self.agreed = False  # the last anti-entropy round reached every peer and every digest matched
        AGREEMENT_AGE.set_function(self.agreement_age_s)

    def agreement_age_s(self) -> float:
        return time.time() - (self.last_agreement or self._started)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        self._watch = asyncio.get_running_loop().create_task(self.credentials.watch(self._stop))

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._watch is not None:
            await asyncio.gather(self._watch, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)

    async def _loop(self) -> None:
        s = self.settings
        next_comparison = time.monotonic()
        while True:
            await asyncio.sleep(s.peer_sync_period_s)
            try:
                await self.sync_once()
                if time.monotonic() >= next_comparison:
                    next_comparison = time.monotonic() + s.anti_entropy_period_s
                    await self.anti_entropy_once()
                    horizon = self.local.tombstones_purgeable()
                    # Only a replica that holds every row its peers hold below the horizon may take absence there
                    # as deletion; rows being written now are newer, so they never hold the purge back.
                    if await self.agree_below(horizon):
                        await self.local.purge_tombstones(horizon)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # never silently: logged, counted, retried next round
                FAILURES.labels("round").inc()
                self.last_error = f"{type(error).__name__}: {error}"
                log.exception("replica sync round failed; retrying in %.1f s", s.peer_sync_period_s)

    def _stub(self, address: str) -> recall_pb2_grpc.RecallStub:
        if address not in self._channels:
            self._channels[address] = RotatingChannel(address, self.credentials)
        return recall_pb2_grpc.RecallStub(self._channels[address].channel)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.credentials.snapshot()[1].metadata

    async def _each_peer(self, step: str, call) -> tuple[int, bool]:
        """``call(address, snapshot_version)`` for every peer; (sum of results, whether every peer answered)."""
        version = self.local.served_snapshot_version()
        if version is None:
            return 0, False
        total, everyone = 0, True
        for address in await self.target.resolve():
            try:
                total += await call(address, version)
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                everyone = False
                FAILURES.labels(step).inc()
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # another snapshot: expected in a switch
                    log.warning("%s with %s: %s", step, address, error.details())
            except Exception as error:
                everyone = False
                FAILURES.labels(step).inc()
                self.last_error = f"{step} with {address}: {type(error).__name__}: {error}"
                log.exception("%s with %s failed", step, address)
        return total, everyone

    async def sync_once(self) -> int:
        """Catch up from every peer; returns the writes applied. A peer that cannot answer is skipped."""
        applied, _ = await self._each_peer("catch-up", self._catch_up_from)
        if applied:
            REPAIRED.labels("catch_up").inc(applied)
            log.info("copied %d writes from the other replicas", applied)
        return applied

    async def _catch_up_from(self, address: str, version: str) -> int:
        stub = self._stub(address)
        known = self._cursors.get(address)
        after = known.after if known and known.snapshot_version == version else (0, 0)
        applied = 0
        while True:
            reply = await stub.Changes(recall_pb2.ChangesRequest(snapshot_version=version, after_seq=after[0],
                                                                 after_key=after[1], limit=PAGE),
                                       metadata=self.metadata, timeout=30)
            if reply.replica_id == self.local.replica_id:
                return 0  # this server, found among its peers
            if known and after != (0, 0) and reply.replica_id != known.replica_id:
                known, after = None, (0, 0)  # another process answers there now: start over (applying is idempotent)
                continue
            if reply.changes:
                applied += await self.local.apply_peer_writes([write_from_proto(c) for c in reply.changes], version)
                after = (reply.changes[-1].seq, reply.changes[-1].key)
            known = PeerCursor(reply.replica_id, version, after)
            self._cursors[address] = known
            if not reply.more:
                return applied

    async def anti_entropy_once(self) -> int:
        """Compare digests with every peer and pull what they hold newer; returns the writes applied."""
        self._disagreed = False
        repaired, everyone = await self._each_peer("anti-entropy", self._reconcile_with)
        self.agreed = everyone and not self._disagreed
        if self.agreed:
            self.last_agreement = time.time()
        if repaired:
            REPAIRED.labels("anti_entropy").inc(repaired)
            log.info("anti-entropy copied %d writes from the other replicas", repaired)
        return repaired

    async def agree_below(self, horizon: Version) -> bool:
        """Whether every peer answered and holds exactly this replica's rows older than ``horizon``."""
        if horizon.clock <= 0:
            return False

        async def same(address: str, version: str) -> int:
            theirs = await self._stub(address).Digest(
                recall_pb2.DigestRequest(snapshot_version=version, below_clock=horizon.clock),
                metadata=self.metadata, timeout=30)
            if theirs.replica_id == self.local.replica_id:
                return 0
            ours = (await self.local.digests(version, horizon.clock)).buckets
            return int(ours != {d.bucket: (d.count, d.hash) for d in theirs.digests})

        differing, everyone = await self._each_peer("purge agreement", same)
        return everyone and not differing

    async def _reconcile_with(self, address: str, version: str) -> int:
        stub, metadata = self._stub(address), self.metadata
        theirs = await stub.Digest(recall_pb2.DigestRequest(snapshot_version=version), metadata=metadata, timeout=30)
        if theirs.replica_id == self.local.replica_id:
            return 0
        ours = (await self.local.digests(version)).buckets
        peer = {d.bucket: (d.count, d.hash) for d in theirs.digests}
        differing = sorted(b for b in set(ours) | set(peer) if ours.get(b) != peer.get(b))
        if not differing:
            return 0
        self._disagreed = True
        applied = 0
        for start in range(0, len(differing), BUCKETS_PER_CALL):
            buckets = differing[start:start + BUCKETS_PER_CALL]
            listed = await stub.Versions(recall_pb2.VersionsRequest(snapshot_version=version, buckets=buckets),
                                         metadata=metadata, timeout=30)
            pull, purged = await self.local.reconcile_plan(
                version, [(v.id, version_from_proto(v.version)) for v in listed.versions], buckets, theirs.purge_horizon)
            if purged:  # deleted at the peer so long ago that its tombstone is gone: delete here too
                horizon = Version(theirs.purge_horizon, "")
                applied += await self.local.apply_peer_writes(
                    [Write(Document(doc_id, "", ""), None, horizon) for doc_id in purged], version)
            while pull:
                reply = await stub.Changes(recall_pb2.ChangesRequest(snapshot_version=version, ids=pull[:PAGE]),
                                           metadata=metadata, timeout=30)
                applied += await self.local.apply_peer_writes([write_from_proto(c) for c in reply.changes],
                                                                version)
                if reply.more and reply.changes:  # cut at its size limit: ask again after the last one answered
                    pull = pull[pull.index(reply.changes[-1].document.id) + 1:]
                else:
                    pull = pull[PAGE:]
        return applied
