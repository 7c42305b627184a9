"""Writes and reads by id, routed to the recall shard that owns each id.

The gateway's recall targets are the shards in order (target i holds shard
i), the same order ``index build --shards`` numbers them; each recall server
also refuses ids it does not own, so a misordered list fails loudly instead
of leaving a second copy. A request that spans shards is split and sent to
each in parallel; a write reaches every replica of its shard, a read one of them; when one
part fails the whole request fails (resending an Upsert or Delete is safe:
both are idempotent).
"""

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass

from gateway.recall_tier import RecallShard
from twostage import errors
from twostage.corpus import Document
from twostage.sharding import shard_of


@dataclass(frozen=True)
class WriteResult:
    count: int  # upserted or deleted
    doc_count: int  # live documents in the shards written to
    timings_ms: dict[str, float]


class DocumentRouter:
    def __init__(self, shards: list[RecallShard]):
        self.shards = shards

    def _split(self, ids: list[str]) -> dict[int, list[int]]:
        """shard -> positions in the request."""
        parts: dict[int, list[int]] = defaultdict(list)
        for position, doc_id in enumerate(ids):
            parts[shard_of(doc_id, len(self.shards))].append(position)
        return parts

    async def _each(self, parts: dict[int, list], call, timeout_s: float, read: bool = False) -> list:
        """``call(client, items, timeout_s)`` per shard: writes on every replica of it, reads on one."""
        deadline = time.monotonic() + timeout_s

        def on_shard(shard: int, items: list):
            if read:
                return self.shards[shard].on_one_replica(lambda client, timeout: call(client, items, timeout), deadline)
            return self.shards[shard].on_every_replica(lambda client: call(client, items, timeout_s))

        replies = await asyncio.gather(*(on_shard(s, items) for s, items in parts.items()), return_exceptions=True)
        for shard, reply in zip(parts, replies):
            if isinstance(reply, errors.TwostageError) and not isinstance(reply, errors.InvalidArgument):
                raise type(reply)(f"shard {shard} of {len(self.shards)} failed ({reply}); resending is safe")
            if isinstance(reply, BaseException):
                raise reply
        return replies

    async def upsert(self, docs: list[Document], timeout_s: float) -> WriteResult:
        _check_count("documents", len(docs))
        start = time.perf_counter()
        parts = {s: [docs[i] for i in positions] for s, positions in self._split([d.id for d in docs]).items()}
        replies = await self._each(parts, lambda client, part, timeout: client.upsert(part, timeout), timeout_s)
        return WriteResult(sum(r[0] for r in replies), sum(r[1] for r in replies), _ms_since(start))

    async def delete(self, ids: list[str], timeout_s: float) -> WriteResult:
        _check_count("ids", len(ids))
        start = time.perf_counter()
        parts = {s: [ids[i] for i in positions] for s, positions in self._split(ids).items()}
        replies = await self._each(parts, lambda client, part, timeout: client.delete(part, timeout), timeout_s)
        return WriteResult(sum(r[0] for r in replies), sum(r[1] for r in replies), _ms_since(start))

    async def get(self, ids: list[str], timeout_s: float) -> tuple[list[Document], list[str]]:
        """(stored documents in request order, ids not stored)."""
        _check_count("ids", len(ids))
        parts = {s: [ids[i] for i in positions] for s, positions in self._split(ids).items()}
        replies = await self._each(parts, lambda client, part, timeout: client.get(part, timeout), timeout_s, read=True)
        found = {d.id: d for reply in replies for d in reply}
        return [found[i] for i in ids if i in found], [i for i in ids if i not in found]


def _check_count(field: str, count: int) -> None:
    # Each shard checks the rest (its own limits); an empty request never reaches one.
    if count == 0:
        raise errors.InvalidArgument(f"{field} must not be empty")


def _ms_since(start: float) -> dict[str, float]:
    return {"total_ms": 1000 * (time.perf_counter() - start)}
