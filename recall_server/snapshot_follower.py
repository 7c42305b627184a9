"""A recall server that follows its shard's snapshots (``--snapshot-dir``):
waits for the first, serves it, and switches to newer ones while serving.
The snapshot layout and the files it reads are in ``recall_server.snapshots``."""

import asyncio
import collections
import contextlib
import logging
import shutil
from pathlib import Path

from recall_server.config import RecallSettings
from recall_server.index import DocumentIndex
from recall_server.snapshots import (
    Snapshot,
    check_managed,
    copy_snapshot,
    newest_snapshot,
    point_at,
    read_adoption,
    record_adoption,
    shard_root,
)
from twostage.errors import ModelMismatch
from twostage.metrics import RECALL_SNAPSHOT_CHECK_FAILURES

log = logging.getLogger(__name__)


class IndexLeases:
    """Calls in flight per index, so a replaced index closes only once its last caller is done."""

    def __init__(self):
        self._in_flight: collections.Counter[int] = collections.Counter()
        self._idle: dict[int, asyncio.Event] = {}

    @contextlib.contextmanager
    def hold(self, index: DocumentIndex):
        key = id(index)
        self._in_flight[key] += 1
        try:
            yield index
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
                if event := self._idle.get(key):
                    event.set()

    async def wait_idle(self, index: DocumentIndex) -> None:
        key = id(index)
        if not self._in_flight.get(key):
            return
        event = self._idle.setdefault(key, asyncio.Event())
        try:
            await event.wait()
        finally:
            self._idle.pop(key, None)


class SnapshotFollower:
    """``switch(fresh, prepare, served)`` is the service's: it holds writes, calls ``prepare(old, fresh)`` in a
    thread, serves ``fresh``, calls ``served()`` in the same step (so the snapshot recorded here always goes with
    the index served) and closes ``old`` once idle."""

    def __init__(self, settings: RecallSettings, model: str, switch, open_index):
        self.settings = settings
        self.model = model
        self._switch = switch
        self._open_index = open_index
        self.root = Path(settings.snapshot_dir)
        self.shard = settings.shard
        self.current: Snapshot | None = None
        self.base_seq = 0  # writes after this sequence in the served copy are this server's own
        self._copy: Path | None = None
        self._refused: set[str] = set()  # versions that can never open here (another model or format)
        self.failures = 0  # checks failed in a row; each is retried at the next poll
        self.last_error: str | None = None  # the latest failure, kept after a success for diagnosis
        self._task: asyncio.Task | None = None
        self._checking = asyncio.Lock()

    def waiting_reason(self) -> str:
        return (f"recall shard {self.shard} has no index yet: waiting for a snapshot under "
                f"{shard_root(self.root, self.shard)} (publish one with 'twostage index build --snapshot-dir "
                f"{self.root} --shard-index {self.shard}')")

    async def start(self) -> None:
        """Serve the copy made before a restart, if any, then wait until some snapshot is served."""
        index_dir = self.settings.index_dir
        await asyncio.to_thread(check_managed, index_dir)
        if (adoption := await asyncio.to_thread(read_adoption, index_dir)) is not None:
            index = await asyncio.to_thread(self._open_index, index_dir)
            copy = await asyncio.to_thread(index_dir.resolve)

            def served() -> None:
                self.current, self.base_seq, self._copy = adoption.snapshot, adoption.base_seq, copy

            await self._switch(index, lambda old, fresh: None, served)
            log.info("serving snapshot %s of shard %d from %s", self.current.version, self.shard, self._copy)
        await self._check_logged()
        if self.current is None:
            log.warning("%s; NOT_SERVING until then", self.waiting_reason())
        while self.current is None:
            await asyncio.sleep(self.settings.snapshot_poll_s)  # polling a shared filesystem: no event to wait on
            await self._check_logged()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_poll_s)
            await self._check_logged()

    async def _check_logged(self) -> None:
        """Any failure of a check (a damaged or half-synced copy raises whatever SQLite, JSON or usearch
        raise) is logged, counted and retried at the next poll, never fatal: the server keeps serving (or
        waiting), and following. CancelledError is not an Exception, so close() still stops it."""
        try:
            await self.check_now()
        except Exception as error:  # noqa: BLE001 - whatever it was, the next poll tries again
            self.failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            RECALL_SNAPSHOT_CHECK_FAILURES.inc()
            log.error("loading a snapshot of shard %d failed (%d in a row): %s; still serving %s, retrying in %gs",
                      self.shard, self.failures, self.last_error,
                      self.current.version if self.current else "nothing", self.settings.snapshot_poll_s)
        else:
            self.failures = 0

    def state(self) -> dict:
        """What Info shows: the snapshot served and how checking for newer ones goes."""
        return {"version": self.current.version if self.current else "", "failures": self.failures,
                "last_error": self.last_error or ""}

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_now(self) -> bool:
        """Adopt the newest snapshot if it is newer than the one served. True when it switched."""
        async with self._checking:
            found = await asyncio.to_thread(newest_snapshot, self.root, self.shard)
            if found is None:
                return False
            snapshot, source = found
            if self.current is not None and snapshot.order <= self.current.order:
                return False
            if snapshot.version in self._refused:
                return False
            if snapshot.model != self.model:
                self._refused.add(snapshot.version)
                log.error("snapshot %s of shard %d was built with model %r but this server serves %r; not "
                          "loading it", snapshot.version, self.shard, snapshot.model, self.model)
                return False
            await self._adopt(snapshot, source)
            return True

    async def _adopt(self, snapshot: Snapshot, source: Path) -> None:
        index_dir = self.settings.index_dir
        log.info("loading snapshot %s of shard %d (%d documents) from %s", snapshot.version, self.shard,
                 snapshot.documents, source)
        copy = await asyncio.to_thread(copy_snapshot, source, index_dir, snapshot)
        try:
            fresh = await asyncio.to_thread(self._open_index, copy)
        except Exception as error:
            await asyncio.to_thread(shutil.rmtree, copy, True)
            # Another model or format never opens here; anything else (a snapshot not fully synced yet, a
            # damaged file) may be whole at a later poll, which copies it afresh.
            if isinstance(error, ModelMismatch):
                self._refused.add(snapshot.version)
            raise
        since, previous = self.base_seq, self._copy

        def prepare(old: DocumentIndex | None, fresh: DocumentIndex) -> None:
            if old is not None:
                carried = fresh.copy_writes(old, since)
                if carried:
                    log.info("carried %d writes made since the last snapshot over to %s", carried, snapshot.version)
            record_adoption(copy, snapshot, base_seq)
            point_at(index_dir, copy)

        def served() -> None:
            self.current, self.base_seq, self._copy = snapshot, base_seq, copy

        try:
            base_seq = await asyncio.to_thread(fresh.store.max_seq)
            await self._switch(fresh, prepare, served)
        except BaseException:
            if await asyncio.to_thread(lambda: Path(index_dir).resolve() == copy.resolve()):
                raise  # switched on disk before a shutdown interrupted it: the copy is what a restart serves
            # Not served (a full disk while carrying writes over, say): the old index goes on, this copy goes,
            # and a later poll tries again from the start.
            await asyncio.to_thread(fresh.close)
            await asyncio.to_thread(shutil.rmtree, copy, True)
            raise
        if previous is not None and previous != copy:
            await asyncio.to_thread(shutil.rmtree, previous, True)
        log.info("serving snapshot %s of shard %d (%d documents)", snapshot.version, self.shard, len(fresh))
