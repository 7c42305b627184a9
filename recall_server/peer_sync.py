"""Replicas of a shard converge on the same documents at the same versions.

Contract:

- Every write carries a version (``twostage.versions``) and a replica keeps,
  per id, only the newest version it has seen (``DocStore.apply``). Copying
  writes between replicas is therefore safe in any order and any number of
  times: a copy never replaces a newer write, and a copy that is not newer is
  a no-op (so copies cannot bounce between replicas).
- **Catch-up.** Each replica reads, from every other replica serving the same
  snapshot, the rows written there since that snapshot (``Recall.Changes``)
  and applies them. Every stored row has a sequence of its own, so the last
  sequence received is an exact cursor: paging never skips a row. A cursor is
  kept per peer process and starts over when another process answers.
- **Anti-entropy.** Every ``anti_entropy_period_s`` a replica compares, with
  each peer, a digest of (id, version, deleted) per bucket of ids
  (``Recall.Digest``), lists the versions in the buckets that differ
  (``Recall.Versions``) and pulls the documents the peer holds newer
  (``Changes`` by id). This repairs what catch-up cannot see: a lost cursor,
  a restored disk, a write that reached only some replicas. The time since
  every peer last agreed is ``twostage_replica_agreement_age_seconds``.
- **Tombstones** are kept for ``tombstone_ttl_s`` (and at least until a
  snapshot newer than the delete is served), then purged, but only by a
  replica whose peers all answered and hold exactly its rows older than the
  purge horizon (a digest of those rows alone, so writes being made now never
  hold a purge back): a replica that may lack writes never takes absence as
  deletion. An id absent from a store is taken as deleted at its purge
  horizon, so a stale copy of it is never pulled; and a replica that holds an
  id live, older than a peer's purge horizon, which that peer lacks, deletes
  it (the peer deleted it so long ago that the tombstone is gone).
- A round that fails (a peer away, a broken reply, a full disk) is logged,
  counted in ``twostage_peer_sync_failures_total`` and retried on the next
  round; the loop never ends while the server runs.
"""

import asyncio
import logging
import time

import grpc
import numpy as np
import prometheus_client as prom

from recall_server.docstore import Write
from twostage.connect import ReloadingCredentials, RotatingChannel
from twostage.convert import document_from_proto
from twostage.corpus import Document
from twostage.membership import Target
from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc
from twostage.versions import Version

log = logging.getLogger(__name__)
PAGE = 512  # changes per Changes reply
BUCKETS_PER_CALL = 16  # buckets per Versions call: about 10,000 documents each on a 10-million-document shard

REPAIRED = prom.Counter("twostage_replica_repaired_total", "Writes copied from other replicas of the shard", ["how"])
FAILURES = prom.Counter("twostage_peer_sync_failures_total", "Catch-up or anti-entropy calls to a peer that failed",
                        ["step"])
AGREEMENT_AGE = prom.Gauge("twostage_replica_agreement_age_seconds",
                           "Seconds since every other replica of the shard last had the same digest as this one")


def version_of(proto: common_pb2.WriteVersion) -> Version:
    return Version(proto.clock, proto.writer)


def version_to_proto(version: Version) -> common_pb2.WriteVersion:
    return common_pb2.WriteVersion(clock=version.clock, writer=version.writer)


def write_from_proto(change: recall_pb2.DocumentChange) -> Write:
    vector = None if change.deleted else np.frombuffer(change.vector, "<f4").astype(np.float32)
    doc = Document(change.document.id, "", "") if change.deleted else document_from_proto(change.document)
    return Write(doc, vector, version_of(change.version), change.seq, change.key)


class PeerSync:
    """``service`` is the RecallService: it applies copied writes and answers for the local store."""

    def __init__(self, settings, service):
        self.settings = settings
        self.service = service
        self.target = Target(settings.peers)
        # Certificates and the peer token are re-read when they change; channels follow (RotatingChannel).
        self.credentials = ReloadingCredentials(settings.tls_dir, settings.peer_token_file,
                                                settings.peer_tls_server_name).load()
        self._stop = asyncio.Event()
        self._watch: asyncio.Task | None = None
        self._channels: dict[str, RotatingChannel] = {}
        # Per peer address: (the process that answered there, the snapshot both served, the (sequence, key) of the
        # last change applied).
        self._cursors: dict[str, tuple[str, str, tuple[int, int]]] = {}
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
                    horizon = self.service.tombstones_purgeable()
                    # Only a replica that holds every row its peers hold below the horizon may take absence there
                    # as deletion; rows being written now are newer, so they never hold the purge back.
                    if await self.agree_below(horizon):
                        await self.service.purge_tombstones(horizon)
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

    def _served_version(self) -> str | None:
        snapshots = self.service.snapshots
        return None if snapshots is None or snapshots.current is None else snapshots.current.version

    async def _each_peer(self, step: str, call) -> tuple[int, bool]:
        """``call(address, snapshot_version)`` for every peer; (sum of results, whether every peer answered)."""
        version = self._served_version()
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
        after = known[2] if known and known[1] == version else (0, 0)
        applied = 0
        while True:
            reply = await stub.Changes(recall_pb2.ChangesRequest(snapshot_version=version, after_seq=after[0],
                                                                 after_key=after[1], limit=PAGE),
                                       metadata=self.metadata, timeout=30)
            if reply.replica_id == self.service.replica_id:
                return 0  # this server, found among its peers
            if known and after != (0, 0) and reply.replica_id != known[0]:
                known, after = None, (0, 0)  # another process answers there now: start over (applying is idempotent)
                continue
            if reply.changes:
                applied += await self.service.apply_peer_writes([write_from_proto(c) for c in reply.changes], version)
                after = (reply.changes[-1].seq, reply.changes[-1].key)
            known = (reply.replica_id, version, after)
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
            if theirs.replica_id == self.service.replica_id:
                return 0
            ours, _, _ = await self.service.digests(version, horizon.clock)
            return int(ours != {d.bucket: (d.count, d.hash) for d in theirs.digests})

        differing, everyone = await self._each_peer("purge agreement", same)
        return everyone and not differing

    async def _reconcile_with(self, address: str, version: str) -> int:
        stub, metadata = self._stub(address), self.metadata
        theirs = await stub.Digest(recall_pb2.DigestRequest(snapshot_version=version), metadata=metadata, timeout=30)
        if theirs.replica_id == self.service.replica_id:
            return 0
        ours, _, _ = await self.service.digests(version)
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
            pull, purged = await self.service.reconcile_plan(
                version, [(v.id, version_of(v.version)) for v in listed.versions], buckets, theirs.purge_horizon)
            if purged:  # deleted at the peer so long ago that its tombstone is gone: delete here too
                horizon = Version(theirs.purge_horizon, "")
                applied += await self.service.apply_peer_writes(
                    [Write(Document(doc_id, "", ""), None, horizon) for doc_id in purged], version)
            while pull:
                reply = await stub.Changes(recall_pb2.ChangesRequest(snapshot_version=version, ids=pull[:PAGE]),
                                           metadata=metadata, timeout=30)
                applied += await self.service.apply_peer_writes([write_from_proto(c) for c in reply.changes],
                                                                version)
                if reply.more and reply.changes:  # cut at its size limit: ask again after the last one answered
                    pull = pull[pull.index(reply.changes[-1].document.id) + 1:]
                else:
                    pull = pull[PAGE:]
        return applied
