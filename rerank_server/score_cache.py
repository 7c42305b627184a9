"""Pair scores already computed, and pairs being computed now.

A cross-encoder's score depends only on the model and the text it reads, so
a pair scored once never needs the model again: head queries, pagination and
retries resend the same pairs. The key is a strong hash (BLAKE2b, 128 bits)
of the model's identity (its file digest, max length, graph), the query as
scored and the document text, so a changed document never reuses an old
score. Every execution plan keeps a score independent of its batch-mates
(twostage.execution_plan), so a cached score is bit-identical to a fresh one.

The cache is bounded in bytes with LRU eviction. Identical pairs in flight at
the same time are computed once (single-flight): the first caller computes,
the others await its result. The computation outlives its caller (a caller
going away neither stops it nor cancels what others await), so its scores
are stored; if it fails for its caller's own reasons (its deadline), the
others compute for themselves.
"""

import asyncio
import hashlib
import sys
from collections import OrderedDict
from dataclasses import dataclass

# What an entry costs beyond its key and score objects: the dict slot and the LRU links (CPython).
_ENTRY_OVERHEAD_BYTES = 100


def entry_bytes(key: bytes, score: float) -> int:
    return sys.getsizeof(key) + sys.getsizeof(score) + _ENTRY_OVERHEAD_BYTES


@dataclass
class CacheStats:
    """Running totals; Prometheus reads them at scrape time (``twostage.metrics.watch_score_cache``)."""

    hits: int = 0
    misses: int = 0
    shared: int = 0
    evictions: int = 0


class PairScoreCache:
    def __init__(self, max_bytes: int, model_identity: str):
        self.max_bytes = max_bytes
        self._prefix = hashlib.blake2b(model_identity.encode(), digest_size=16).digest()
        self._scores: OrderedDict[bytes, float] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Future] = {}
        self.bytes = 0
        self.stats = CacheStats()

    def key(self, query: str, document: str) -> bytes:
        digest = hashlib.blake2b(self._prefix, digest_size=16)
        for part in (query, document):
            data = part.encode()
            digest.update(len(data).to_bytes(8, "little"))  # lengths first: ("ab", "c") never meets ("a", "bc")
            digest.update(data)
        return digest.digest()

    def get(self, key: bytes) -> float | None:
        score = self._scores.get(key)
        if score is None:
            return None
        self._scores.move_to_end(key)
        return score

    def put(self, key: bytes, score: float) -> None:
        if key in self._scores:
            self._scores.move_to_end(key)
            return
        size = entry_bytes(key, score)
        if size > self.max_bytes:
            return
        self._scores[key] = score
        self.bytes += size
        while self.bytes > self.max_bytes:
            old_key, old_score = self._scores.popitem(last=False)
            self.bytes -= entry_bytes(old_key, old_score)
            self.stats.evictions += 1

    def __len__(self) -> int:
        return len(self._scores)

    def split(self, keys: list[bytes]) -> tuple[dict[int, float], dict[int, asyncio.Future], list[int]]:
        """For the pairs of one request: (position -> cached score, position -> a computation in flight to
        await, positions this request computes). The positions it computes are registered as in flight."""
        cached, awaited, to_compute = {}, {}, []
        loop = asyncio.get_running_loop()
        for position, key in enumerate(keys):
            if (score := self.get(key)) is not None:
                cached[position] = score
            elif (future := self._in_flight.get(key)) is not None:
                awaited[position] = future
            else:
                self._in_flight[key] = loop.create_future()
                to_compute.append(position)
        self.stats.hits += len(cached)
        self.stats.shared += len(awaited)
        self.stats.misses += len(to_compute)
        return cached, awaited, to_compute

    def finish(self, keys: list[bytes], scores: list[float | None] | None, error: BaseException | None = None) -> None:
        """The computation of these in-flight keys ended: store and hand out the scores; a key without one
        (``scores`` None, or None in its place: not computed) hands out the error and stores nothing."""
        for i, key in enumerate(keys):
            future = self._in_flight.pop(key, None)
            score = None if scores is None else scores[i]
            if score is not None:
                self.put(key, score)
            if future is not None and not future.done():
                if score is not None:
                    future.set_result(score)
                else:
                    future.set_exception(error or RuntimeError("computation abandoned"))
                    future.exception()  # retrieved here: a follower may have gone, nobody else would
