"""The recall tier as the gateway sees it: shards, each served by one or more
interchangeable replicas.

Target i of ``recall_targets`` is shard i (the order ``index build --shards``
numbers them). A search goes to one replica of every shard, taken in turn;
when a replica is unreachable or not serving, the next replica of the same
shard answers within the same deadline. A write goes to every replica of the
shard that owns the id, so each replica's copy stays whole; it succeeds only
when all of them acknowledge (resending is safe).
"""

import asyncio
import itertools
import logging
import time

from gateway.clients import RecallClient
from twostage import errors
from twostage.membership import Target

log = logging.getLogger(__name__)


class RecallShard:
    def __init__(self, index: int, target: Target, make_client):
        self.index = index
        self.target = target
        self._make_client = make_client
        self.replicas: list[RecallClient] = []
        self._turn = itertools.count()
        self.unreachable = asyncio.Event()
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

    async def search(self, query: str, k: int, deadline_s: float, request_id: str, mode: str | None = None,
                     filter_=None):
        return await self.on_one_replica(
            lambda client, timeout: client.search(query, k, timeout, request_id, mode, filter_), deadline_s)

    async def on_one_replica(self, call, deadline_s: float):
        """A read: ``call(client, timeout_s)`` on one replica, taken in turn; an unreachable one hands over to
        the next while time remains."""
        replicas = list(self.replicas)
        if not replicas:
            raise errors.Unavailable(f"{self.name} has no replicas (its name resolves to nothing yet)")
        start = next(self._turn)
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

    async def on_every_replica(self, call):
        """``call(client)`` on every replica in parallel; all must succeed. Returns the first reply."""
        replicas = list(self.replicas)
        if not replicas:
            raise errors.Unavailable(f"{self.name} has no replicas (its name resolves to nothing yet)")
        replies = await asyncio.gather(*(call(c) for c in replicas), return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies[0]
