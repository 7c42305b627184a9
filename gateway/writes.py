"""Writes and reads by id, routed to the recall shard that owns each id.

Write contract, as a client can rely on it:

- **Validated whole at the edge.** The request is checked with the rules the
  recall servers apply (``twostage.documents``, with the limits they publish)
  before any shard sees it, so an invalid document never leaves part of a
  request applied. Errors name the position in the client's request.
- **One version per request**, from this gateway's hybrid logical clock
  (``twostage.versions``): every document of it carries the same version on
  every shard and replica, and concurrent writes of one id through different
  gateways have one order that every replica agrees on.
- **Acknowledged once durable on ``write_quorum`` replicas of every shard it
  touches** (each replica commits to disk before it answers). ``majority``
  (default) survives the loss of a minority of a shard's replicas and keeps
  accepting writes while one is down; ``all`` waits for every replica (one
  replica away blocks the shard's writes); ``one`` answers after the first
  (a write acknowledged by a replica whose disk is then lost is gone). The
  reply says how many replicas acknowledged each shard's part. Replicas that
  missed the write converge by catch-up and anti-entropy (``recall_server.replication``
  states what an acknowledgement means and how replicas converge).
- **Retries.** A resend with the same ``request_id`` to this gateway is applied
  at the same version and answered alike (request ids are remembered for
  ``request_id_ttl_s``). Each recall replica stores the request ids it
  applied, so a resend through another gateway (or after a restart) is not
  applied twice by a replica that took the first; the replicas that had not
  take it at that gateway's version, and replicas converge on the newer of
  the two, which carries the same content.
- **Last writer wins, by version.** A write of an id that a replica already
  holds at a newer version (a later write through another gateway, or one
  whose clock runs ahead) is superseded: the reply counts such documents in
  ``superseded``, and the gateway moves its clock past the newest version the
  replicas hold, so its next write of those ids is ordered after it. Between
  gateways, order follows their clocks within their skew; keep hosts on NTP.
- **A write that fails part-way** (too few replicas of some shard answered) is
  reported UNAVAILABLE with what is durable where (a write that no replica
  took, for one reason everywhere, is reported as that reason: shed load is
  RESOURCE_EXHAUSTED, say). It may still take effect,
  since the replicas that took it spread it to the others; resending it with
  the same request_id finishes it at the same version. Never assume that a
  failed write did not happen.

Reads (Get) are answered by one replica of each shard and may trail the
newest acknowledged write by a catch-up period.
"""

import asyncio
import collections
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import NamedTuple

from gateway.recall_tier import RecallShard, ShardWrite
from twostage import errors
from twostage.corpus import Document
from twostage.documents import DEFAULT_LIMITS, DocumentLimits, check_documents, check_ids, check_request_id
from twostage.schema import conform
from twostage.sharding import shard_of
from twostage.versions import HybridClock, Version

_POSITION = re.compile(r"^(documents|ids)\[(\d+)\]")


@dataclass(frozen=True)
class ShardAcks:
    shard: int
    documents: int
    acknowledged: int
    replicas: int


@dataclass(frozen=True)
class WriteResult:
    count: int  # upserted or deleted
    doc_count: int  # live documents in the shards written to
    timings_ms: dict[str, float]
    version: Version
    shards: list[ShardAcks]
    request_id: str
    superseded: int = 0  # documents held at a newer version by the replicas that answered
    newest: Version | None = None


class StoredDocuments(NamedTuple):
    """What a read by ids found."""

    found: list[Document]  # in request order
    missing: list[str]  # the ids no shard stores


@dataclass
class _Remembered:
    fingerprint: str
    version: Version
    at: float
    result: WriteResult | None = None
    running: asyncio.Future | None = None


class RequestLog:
    """Request ids this gateway has written: a resend gets the first version, and the first answer once one
    exists. Bounded in count and age."""

    def __init__(self, ttl_s: float, most: int):
        self.ttl_s, self.most = ttl_s, most
        self._entries: collections.OrderedDict[str, _Remembered] = collections.OrderedDict()

    def entry(self, request_id: str, fingerprint: str, new_version) -> _Remembered:
        now = time.monotonic()
        while self._entries and (len(self._entries) >= self.most
                                 or next(iter(self._entries.values())).at < now - self.ttl_s):
            self._entries.popitem(last=False)
        known = self._entries.get(request_id)
        if known is None:
            known = self._entries[request_id] = _Remembered(fingerprint, new_version(), now)
        elif known.fingerprint != fingerprint:
            raise errors.InvalidArgument(f"request_id {request_id!r} was already used for a different write; "
                                         "use a new request_id for a new write")
        return known


def _fingerprint(kind: str, items: list) -> str:
    return hashlib.sha256(json.dumps([kind, items], sort_keys=True).encode()).hexdigest()


class DocumentRouter:
    def __init__(self, shards: list[RecallShard], limits=None, write_quorum: str = "majority",
                 request_id_ttl_s: float = 3600.0, request_ids_kept: int = 100_000, shard_replicas: int = 0):
        self.shards = shards
        self.limits = limits  # StageLimits: what the recall servers accept
        self.write_quorum = write_quorum
        self.shard_replicas = shard_replicas
        self.clock = HybridClock(f"gateway-{uuid.uuid4().hex[:12]}")
        self.requests = RequestLog(request_id_ttl_s, request_ids_kept)

    def _document_limits(self) -> DocumentLimits:
        limits = self.limits
        return DocumentLimits(
            getattr(limits, "recall_max_upsert_docs", None) or DEFAULT_LIMITS.max_docs,
            getattr(limits, "recall_max_doc_chars", None) or DEFAULT_LIMITS.max_doc_chars,
            getattr(limits, "recall_max_id_chars", None) or DEFAULT_LIMITS.max_id_chars,
        )

    def _split(self, ids: list[str]) -> dict[int, list[int]]:
        """shard -> positions in the request."""
        parts: dict[int, list[int]] = collections.defaultdict(list)
        for position, doc_id in enumerate(ids):
            parts[shard_of(doc_id, len(self.shards))].append(position)
        return parts

    async def _write(self, kind: str, items: list, ids: list[str], request_id: str, timeout_s: float,
                     send) -> WriteResult:
        """``send(client, part, version, request_id, timeout)`` on a quorum of each shard's replicas."""
        check_request_id(request_id)
        if not request_id:  # nobody can resend it by id: nothing to remember, here or on the replicas
            return await self._send_to_shards(items, ids, "", self.clock.now(), timeout_s, send)
        fingerprint = await asyncio.to_thread(_fingerprint, kind, items)  # hashing a large request takes a while
        remembered = self.requests.entry(request_id, fingerprint, self.clock.now)
        while True:
            if remembered.result is not None:
                return remembered.result
            running = remembered.running
            if running is None:
                break
            try:  # the same request, still in flight: share its outcome
                return await asyncio.shield(running)
            except errors.TwostageError:
                continue  # it failed: unless another resend has started meanwhile, this one tries again
        running = remembered.running = asyncio.get_running_loop().create_future()
        try:
            result = await self._send_to_shards(items, ids, request_id, remembered.version, timeout_s, send)
        except BaseException as error:
            running.set_exception(error if isinstance(error, errors.TwostageError)
                                  else errors.Unavailable("the first attempt was cancelled"))
            running.exception()  # retrieved: nobody need wait on it
            if remembered.running is running:
                remembered.running = None
            raise
        remembered.result = result
        running.set_result(result)
        return result

    async def _send_to_shards(self, items: list, ids: list[str], request_id: str, version: Version,
                              timeout_s: float, send) -> WriteResult:
        start = time.perf_counter()
        positions = self._split(ids)
        parts = {s: [items[i] for i in where] for s, where in positions.items()}
        outcomes = await asyncio.gather(*(
            self.shards[s].on_quorum(lambda client, timeout, part=part: send(client, part, version, request_id,
                                                                             timeout),
                                     self.write_quorum, timeout_s, self.shard_replicas)
            for s, part in parts.items()))
        by_shard: dict[int, ShardWrite] = dict(zip(parts, outcomes))
        for shard, outcome in by_shard.items():
            if outcome.invalid is not None:
                raise _in_client_positions(outcome.invalid, positions[shard])
        if short := [s for s, o in by_shard.items() if not o.met]:
            durable = "; ".join(
                f"shard {s} on {o.acknowledged} of {o.replicas} replicas ({o.needed} needed"
                + (f": {o.error}" if o.error else "") + ")" for s, o in sorted(by_shard.items()))
            # Nothing applied anywhere, for one reason everywhere (every replica shed the load, say): reported as
            # that reason, so a caller backs off as it would for a single server. Otherwise the tier is unavailable.
            kinds = {type(error) for s in short for error in by_shard[s].failures}
            nothing_applied = not any(o.replies for o in by_shard.values())
            kind = next(iter(kinds)) if len(kinds) == 1 and nothing_applied else errors.Unavailable
            raise (kind if issubclass(kind, errors.TwostageError) else errors.Unavailable)(
                f"write not acknowledged: shard {', '.join(map(str, short))} could not make it durable on enough "
                f"replicas. Durable so far: {durable}. It may still take effect; "
                + (f"resend it with request_id {request_id!r} to finish it at the same version" if request_id else
                   "resending it applies it again at a new version (give writes a request_id to resend them "
                   "exactly)"))
        acks = [ShardAcks(s, len(parts[s]), o.acknowledged, o.replicas) for s, o in sorted(by_shard.items())]
        replies = [reply for o in by_shard.values() for reply in o.replies]
        if newest := max((reply.newest for reply in replies if reply.newest is not None), default=None):
            self.clock.observe(newest.clock)  # this gateway's next write of these ids is ordered after them
        return WriteResult(
            count=sum(max(reply.count for reply in o.replies) for o in by_shard.values()),
            doc_count=sum(max(reply.doc_count for reply in o.replies) for o in by_shard.values()),
            timings_ms={"total_ms": 1000 * (time.perf_counter() - start)},
            version=version, shards=acks, request_id=request_id,
            superseded=sum(max(reply.superseded for reply in o.replies) for o in by_shard.values()),
            newest=newest,
        )

    async def upsert(self, docs: list[Document], timeout_s: float, request_id: str = "") -> WriteResult:
        check_documents(docs, self._document_limits())
        # Shards type a new key by its first value each on their own: one request that gives a key two types
        # would store both (one per shard), so it is refused here, before any shard stores any of it.
        conform(docs, {}, coerce=True, hint=False, holder="earlier documents of this request hold")
        items = [[d.id, d.title, d.text, d.metadata] for d in docs]
        docs_by_id = {d.id: d for d in docs}
        return await self._write("upsert", items, [d.id for d in docs], request_id, timeout_s,
                                 lambda client, part, version, rid, timeout: client.upsert(
                                     [docs_by_id[row[0]] for row in part], timeout, rid, version))

    async def delete(self, ids: list[str], timeout_s: float, request_id: str = "") -> WriteResult:
        check_ids(ids, self._document_limits())
        return await self._write("delete", list(ids), ids, request_id, timeout_s,
                                 lambda client, part, version, rid, timeout: client.delete(part, timeout, rid, version))

    async def get(self, ids: list[str], timeout_s: float) -> StoredDocuments:
        check_ids(ids, self._document_limits())
        deadline = time.monotonic() + timeout_s
        parts = {s: [ids[i] for i in where] for s, where in self._split(ids).items()}
        replies = await asyncio.gather(*(
            self.shards[s].on_one_replica(lambda client, timeout, part=part: client.get(part, timeout), deadline)
            for s, part in parts.items()), return_exceptions=True)
        for shard, reply in zip(parts, replies):
            if isinstance(reply, errors.TwostageError) and not isinstance(reply, errors.InvalidArgument):
                raise type(reply)(f"shard {shard} of {len(self.shards)} failed ({reply})")
            if isinstance(reply, BaseException):
                raise reply
        found = {d.id: d for reply in replies for d in reply}
        return StoredDocuments([found[i] for i in ids if i in found], [i for i in ids if i not in found])


def _in_client_positions(error: errors.InvalidArgument, positions: list[int]) -> errors.InvalidArgument:
    """A shard's refusal names a position in its part of the request; say which one the client sent."""
    message = _POSITION.sub(lambda m: f"{m.group(1)}[{positions[int(m.group(2))]}]"
                            if int(m.group(2)) < len(positions) else m.group(0), str(error))
    return errors.InvalidArgument(message)
