"""The recall tier as the gateway sees it: shards, each served by one or more
interchangeable replicas.

Target i of ``recall_targets`` is shard i (the order ``index build --shards``
numbers them). A search goes to one replica of every shard, taken in turn;
when a replica is unreachable or not serving, the next replica of the same
shard answers within the same deadline. A write goes to every replica of the
shard that owns the id and is acknowledged once a quorum of them has made it
durable (``gateway.writes`` states the contract); the calls to the rest run
on to their deadline, so a replica that is merely slow still takes the write.
"""

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

from gateway.clients import RecallClient
from twostage import errors
from twostage.membership import Target
from twostage.recall_mode import RecallMode

log = logging.getLogger(__name__)


QUORUMS = ("majority", "all", "one")


def quorum_size(quorum: str, replicas: int) -> int:
    return {"majority": replicas // 2 + 1, "all": replicas, "one": 1}[quorum]


@dataclass
class ShardWrite:
    """How one shard's part of a write went."""

    replicas: int
    needed: int
    replies: list = field(default_factory=list)  # the acknowledging replicas' answers
    error: str = ""  # the first failure, when some replica failed
    invalid: errors.InvalidArgument | None = None  # every replica refused the request itself
    failures: list = field(default_factory=list)  # every replica's error

    @property
    def acknowledged(self) -> int:
        return len(self.replies)

    @property
    def met(self) -> bool:
        return self.acknowledged >= self.needed


class RecallShard:
    def __init__(self, index: int, target: Target, make_client):
        self.index = index
        self.target = target
        self._make_client = make_client
        self.replicas: list[RecallClient] = []
        self._turn = itertools.count()
        self.unreachable = asyncio.Event()
        self._stragglers: set[asyncio.Task] = set()  # write calls past the quorum, kept until they end
        self.update_members(target.addresses)

    @property
    def name(self) -> str:
        return f"recall shard {self.index}"

    def update_members(self, addresses: list[str]) -> tuple[list[str], list[str]]:
        current = {c.target: c for c in self.replicas}
        added = [a for a in addresses if a not in current]
        removed = [c for c in self.replicas if c.target not in set(addresses)]
        if not added and not removed:
            return [], []
        self.replicas = [current.get(a) or self._make_client(a, self.name) for a in addresses]
        for client in removed:
            # In-flight calls keep their channel until they end; close it a little later.
            asyncio.get_running_loop().call_later(30, lambda c=client: asyncio.ensure_future(c.close()))
        return added, [c.target for c in removed]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.replicas), return_exceptions=True)

    async def search(self, query: str, k: int, deadline_s: float, request_id: str, mode: RecallMode | None = None,
                     filter_=None, replica: str | None = None, **feedback):
        """``feedback``: RecallClient.search's prf, query_vector, feedback_vector and return_vectors. ``replica``:
        the one to ask first (a second round of feedback goes where the first went)."""
        return await self.on_one_replica(
            lambda client, timeout: client.search(query, k, timeout, request_id, mode, filter_, **feedback), deadline_s,
            replica)

    async def on_one_replica(self, call, deadline_s: float, prefer: str | None = None):
        """A read: ``call(client, timeout_s)`` on one replica, taken in turn (``prefer``: that one first, while it
        is a member); an unreachable one hands over to the next while time remains."""
        replicas = list(self.replicas)
        if not replicas:
            raise errors.Unavailable(f"{self.name} has no replicas (its name resolves to nothing yet)")
        targets = [client.target for client in replicas]
        start = targets.index(prefer) if prefer in targets else next(self._turn)
        last_error: errors.TwostageError | None = None
        for attempt in range(len(replicas)):
            timeout = deadline_s - time.monotonic()
            if timeout <= 0:
                break
            client = replicas[(start + attempt) % len(replicas)]
            try:
                return await call(client, timeout)
            except (errors.Unavailable, errors.NotReady) as error:
                self.unreachable.set()
                last_error = error
        raise last_error or errors.DeadlineExceeded(f"{self.name}: the deadline passed")

    async def on_quorum(self, call, quorum: str, timeout_s: float, expected_replicas: int = 0) -> ShardWrite:
        """``call(client, timeout_s)`` on every replica at once; returns once ``quorum`` of them succeeded, or
        once every call has ended short of it. Calls still running after a quorum go on in the background until
        they end (their own timeout)."""
        replicas = list(self.replicas)
        if not replicas:
            raise errors.Unavailable(f"{self.name} has no replicas (its name resolves to nothing yet)")
        # Counted against the replicas the shard is meant to have: a down replica's name may not resolve at all.
        size = max(len(replicas), expected_replicas)
        outcome = ShardWrite(size, quorum_size(quorum, size))
        pending = {asyncio.ensure_future(call(client, timeout_s)) for client in replicas}
        refusals = []
        # Short of a quorum, every call is waited for, so the error says exactly what is durable where.
        while pending and not outcome.met:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is None:
                    outcome.replies.append(task.result())
                    continue
                error = task.exception()
                outcome.failures.append(error)
                if isinstance(error, errors.InvalidArgument):
                    refusals.append(error)
                if isinstance(error, errors.Unavailable | errors.NotReady):
                    self.unreachable.set()
                outcome.error = outcome.error or str(error)
        for task in pending:
            self._stragglers.add(task)
            task.add_done_callback(self._straggler_done)
        if not outcome.replies and refusals and len(refusals) == len(replicas) - len(pending):
            outcome.invalid = refusals[0]
        return outcome

    def _straggler_done(self, task: asyncio.Task) -> None:
        self._stragglers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("%s: a replica the write did not wait for failed: %s", self.name, task.exception())
