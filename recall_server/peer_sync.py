"""Replicas of a shard catch up from each other.

The gateway sends every write to every replica of the owning shard, but only
to those it can reach: a replica that was restarting, or is new, misses
writes. Each replica therefore reads, from every other replica serving the
same snapshot, the writes that one took from clients (``Recall.Changes``)
and applies those it lacks, keeping the copy's ``from_peer`` mark so that it
never serves them on in turn: only writes a replica took from a client
travel, so copies cannot bounce between replicas.

A change is applied only when the document differs from the local one, so a
replica that already has a write does nothing. Replicas converge within one
``peer_sync_period_s`` of a write; two different writes of one id through
two gateways at the same moment may leave replicas holding different
versions of that id until it is written again.
"""

import asyncio
import logging

import grpc
import numpy as np

from twostage.connect import Credentials, read_token_file
from twostage.convert import document_from_proto
from twostage.corpus import Document
from twostage.membership import Target
from twostage.v1 import recall_pb2, recall_pb2_grpc

log = logging.getLogger(__name__)
PAGE = 512


def apply_changes(index, changes: list[tuple[Document, np.ndarray | None]]) -> int:
    """Apply a peer's changes this index lacks (runs in a thread). Returns how many it applied."""
    local = index.get([doc.id for doc, _ in changes])
    lacking = [(doc, vector) for doc, vector in changes
               if (local.get(doc.id) != doc if vector is not None else doc.id in local)]
    index.apply_writes(lacking, from_peer=True)
    return len(lacking)


class PeerSync:
    """``service`` is the RecallService: its index, write gate and snapshot follower."""

    def __init__(self, settings, service):
        self.settings = settings
        self.service = service
        self.target = Target(settings.peers)
        self.credentials = Credentials(settings.tls_dir, read_token_file(settings.peer_token_file),
                                       settings.peer_tls_server_name)
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Per peer address: (the process that answered there, the snapshot both served, its last sequence applied).
        self._cursors: dict[str, tuple[str, str, int]] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.peer_sync_period_s)
            await self.sync_once()

    async def sync_once(self) -> int:
        """One pass over every peer; returns the changes applied. A peer that cannot answer is skipped."""
        applied = 0
        for address in await self.target.resolve():
            try:
                applied += await self._sync_from(address)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # another snapshot: expected in a switch
                    log.warning("catching up from %s: %s", address, error.details())
        if applied:
            log.info("copied %d writes from the other replicas", applied)
        return applied

    async def _sync_from(self, address: str) -> int:
        snapshots = self.service.snapshots
        if snapshots is None or snapshots.current is None:
            return 0
        version = snapshots.current.version
        if address not in self._channels:
            self._channels[address] = self.credentials.aio_channel(address)
        stub = recall_pb2_grpc.RecallStub(self._channels[address])
        known = self._cursors.get(address)
        after = known[2] if known and known[1] == version else 0
        applied = 0
        while True:
            reply = await stub.Changes(recall_pb2.ChangesRequest(snapshot_version=version, after_seq=after, limit=PAGE),
                                       metadata=self.credentials.metadata, timeout=30)
            if reply.replica_id == self.service.replica_id:
                return 0  # this server, found among its peers
            if known and after and reply.replica_id != known[0]:
                known, after = None, 0  # another process answers there now: its sequences start afresh
                continue
            if reply.changes:
                changes = [(document_from_proto(c.document),
                            None if c.deleted else np.frombuffer(c.vector, np.float32)) for c in reply.changes]
                applied += await self.service.apply_peer_changes(changes)
                after = reply.changes[-1].seq
            known = (reply.replica_id, version, after)
            self._cursors[address] = known
            if len(reply.changes) < PAGE:
                return applied
