"""Dynamic batching: concurrent callers' items are coalesced into batches.

A batch is flushed when it would exceed ``max_batch_size`` items or
``max_batch_tokens`` padded tokens (items x longest item), or when its oldest
item has waited ``max_wait_ms``. The most urgent items go first (earliest
deadline, then oldest), so a caller that books its work behind earlier work
can predict when it will be done; among items due at the same time (one
request's items, or items without deadlines), batches are grouped by length
so they pad little, and room left in a batch is filled with the next most
urgent items that fit. Items are tokenized before they are queued, so each
one's cost is known; the model runs on a dedicated executor while the next
batch forms.

Two lanes: interactive items (queries) go before bulk items (documents being
written), so a large upsert never holds searches back; bulk batches are kept
small (``bulk_max_batch_tokens``) so a query arriving mid-batch waits little,
and the oldest bulk item is served anyway once it has waited
``bulk_max_wait_ms`` (no starvation).

Traced (twostage.tracing), each submission records its queue wait, and each
batch is a span that links to the span of every request it served.

An item is left out uncomputed when even alone it would finish after its
deadline, by the lane's own estimate; a lane that has refused everything for
a while runs one such item anyway, to correct an estimate that one slow batch
may have inflated (nothing else would: a refused item teaches nothing).

Every future handed out here is resolved: with a result, with the batch's
error, with DeadlineExceeded when its deadline passed before it was computed,
or with NotReady when the batcher is shut down without draining.
"""

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Generic, TypeVar

from twostage import tracing
from twostage.config import BatchingSettings
from twostage.errors import DeadlineExceeded, ModelFailure, NotReady, Overloaded, TwostageError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def _from_settings(cls, settings: BatchingSettings):
    return cls(**{name: getattr(settings, name) for name in BatchingSettings.model_fields})


# The batcher's knobs are BatchingSettings' fields, with their defaults (documented there), as a plain frozen
# record: a service builds it from its settings (from_settings), a test or benchmark names only what it changes.
BatchPolicy = make_dataclass(
    "BatchPolicy",
    [(name, info.annotation, field(default=info.default)) for name, info in BatchingSettings.model_fields.items()],
    frozen=True, namespace={"__module__": __name__, "from_settings": classmethod(_from_settings)},
)


def plan_batches(lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group item indices into length-sorted batches within both limits.

    An item longer than the token budget still gets a batch of its own.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        grown = len(current) + 1
        if current and (grown > max_batch_size or grown * lengths[index] > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@dataclass
class BatchStats:
    """Running totals for benchmarks and metrics."""

    batches: int = 0
    items: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    shed_items: int = 0
    expired_items: int = 0
    failed_batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)

    @property
    def padding_waste(self) -> float:
        return 1 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


@dataclass(eq=False)
class _Item:
    payload: Any
    length: int
    future: asyncio.Future
    enqueued_s: float
    deadline_s: float | None
    bulk: bool = False
    dispatched_s: float = 0.0
    done_s: float = 0.0
    trace: Any = None  # the submitting request's span context, when traced


def _due(item: _Item) -> float:
    return item.deadline_s if item.deadline_s is not None else float("inf")


def _urgency(item: _Item) -> tuple[float, float]:
    return _due(item), item.enqueued_s


@dataclass(frozen=True)
class Submission(Generic[R]):
    values: list[R | None]  # None only with partial=True: an item its deadline left uncomputed
    queue_ms: float
    compute_ms: float


@dataclass(frozen=True)
class Cost:
    """What one request cost a replica's model, as its reply reports it (the Cost message): how long it queued
    before its first batch, the model time its batches took, and the replica's current model time per item
    (the batcher's ``ms_per_item``). Callers model the replica with it; timings are for diagnostics."""

    queue_ms: float = 0.0
    service_ms: float = 0.0
    ms_per_item: float = 0.0

    @classmethod
    def of(cls, submissions: Sequence[Submission], ms_per_item: float) -> "Cost":
        """A request's cost from the submissions that computed its items, in order (none: the model computed
        nothing for it, and it queued for nothing)."""
        return cls(submissions[0].queue_ms if submissions else 0.0, sum(s.compute_ms for s in submissions),
                   ms_per_item)


class BatchCost:
    """A batch's model time as a fixed part plus a part per padded token, fitted by least squares over
    recent batches (each older batch weighs ``memory`` times less than the one after it)."""

    def __init__(self, memory: float = 0.9):
        self.memory = memory
        self._sums = [0.0] * 5  # weight, tokens, ms, tokens^2, tokens x ms

    def add(self, padded_tokens: int, ms: float) -> None:
        x, y = float(padded_tokens), ms
        self._sums = [self.memory * total + term for total, term in zip(self._sums, (1.0, x, y, x * x, x * y))]

    def parts(self) -> tuple[float, float] | None:
        """(fixed ms, ms per token), neither negative; None until samples of clearly different sizes have been
        seen (one shape cannot separate the parts)."""
        weight, sx, sy, sxx, sxy = self._sums
        if not weight:
            return None
        mean_x, mean_y = sx / weight, sy / weight
        variance = sxx / weight - mean_x**2
        if variance <= (0.1 * mean_x) ** 2:
            return None
        per_token = max(0.0, (sxy / weight - mean_x * mean_y) / variance)
        return max(0.0, mean_y - per_token * mean_x), per_token

    def predict(self, padded_tokens: int) -> float | None:
        """None until batches of clearly different sizes have been seen (see ``parts``)."""
        parts = self.parts()
        return None if parts is None else parts[0] + parts[1] * padded_tokens


# Tokens a pair's text is estimated to take when the replica has not said (English WordPiece runs 4.5-4.7
# characters a token on SciFact and on a product catalogue: 4 errs toward predicting a pair dearer).
DEFAULT_CHARS_PER_TOKEN = 4.0
PAIR_SPECIAL_TOKENS = 3  # [CLS] query [SEP] document [SEP]


@dataclass(frozen=True)
class PairCost:
    """What one (query, document) pair costs a cross-encoder: ``fixed_ms + ms_per_token x tokens`` of model
    time, tokens being the pair's length as the model reads it (query and document, cut at ``max_length``).
    A replica fits it when its model loads (``fit``) and publishes it; callers predict a pair's cost from its
    text (``estimate_tokens``), so a short document is not planned at the price of a long one."""

    fixed_ms: float
    ms_per_token: float
    max_length: int
    chars_per_token: float = DEFAULT_CHARS_PER_TOKEN

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, float]], max_length: int,
            chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> "PairCost":
        """Least squares over (tokens, ms per pair) samples, neither part negative."""
        line = BatchCost(memory=1.0)
        for tokens, ms in samples:
            line.add(tokens, ms)
        parts = line.parts()
        if parts is None or parts[0] == 0:
            # One length only, or a line that would cost less than nothing at no tokens (noise: the per-token
            # cost grows a little with length): a line through 0 instead, which prices short pairs higher.
            squares = sum(t * t for t, _ in samples)
            parts = (0.0, sum(t * ms for t, ms in samples) / squares if squares else 0.0)
        return cls(parts[0], parts[1], max_length, chars_per_token)

    def pair_ms(self, tokens: int) -> float:
        return self.fixed_ms + self.ms_per_token * min(tokens, self.max_length)

    def batch_ms(self, pairs: int, tokens: int) -> float:
        """Predicted model time of ``pairs`` pairs of ``tokens`` tokens in all."""
        return pairs * self.fixed_ms + self.ms_per_token * tokens

    def estimate_tokens(self, query_chars: int, document_chars: int) -> int:
        """A pair's length as the model will read it, from its characters: the query cut at half the window
        (as the replica cuts it), the document filling the rest, at most ``max_length``."""
        per = self.chars_per_token if self.chars_per_token > 0 else DEFAULT_CHARS_PER_TOKEN
        query = min(math.ceil(query_chars / per), self.max_length // 2)
        return min(self.max_length, query + math.ceil(document_chars / per) + PAIR_SPECIAL_TOKENS)


# A lane that has run nothing for this long may be refusing items on a stale estimate (see _timed_compute).
STALE_S = 1.0

# Called after each batch: (size, real_tokens, padded_tokens, queue_waits_s, compute_s).
BatchObserver = Callable[[int, int, int, list[float], float], None]


class DynamicBatcher(Generic[T, R]):
    def __init__(
        self,
        name: str,
        compute: Callable[[list[T]], Sequence[R]],
        policy: BatchPolicy,
        executor: Executor | None = None,
        observers: Sequence[BatchObserver] = (),
    ):
        self.name = name
        self.policy = policy
        self.stats = BatchStats()
        self._compute = compute
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")
        self._observers = list(observers)
        self._queue: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.pipeline_depth)
        self._in_flight: set[asyncio.Task] = set()
        self._started_at: dict[asyncio.Task, float] = {}
        self._last_bulk_s = time.monotonic()  # when the bulk lane last got a batch
        # Each lane has its own cost model: a query's is never predicted from documents being written.
        self.ms_per_item = 0.0  # interactive model time per item, recent batches weighted most (callers model cost)
        self.batch_cost = BatchCost()  # predicts one interactive batch's model time from its padded tokens
        self.bulk_ms_per_item = 0.0
        self.bulk_batch_cost = BatchCost()
        self._lane_done_s = {False: time.monotonic(), True: time.monotonic()}  # when each lane's last batch ended
        self._closing = False
        self._runner: asyncio.Task | None = None

    def reset_costs(self) -> None:
        """Forget what batches cost so far: a warm-up's first run allocates and is no guide to the next ones."""
        self.ms_per_item = self.bulk_ms_per_item = 0.0
        self.batch_cost, self.bulk_batch_cost = BatchCost(), BatchCost()

    def add_observer(self, observer: BatchObserver) -> None:
        self._observers.append(observer)

    @property
    def queued_items(self) -> int:
        return len(self._queue)

    def longest_running_s(self) -> float:
        """How long the oldest batch now in the model has been running (0 when none is)."""
        if not self._started_at:
            return 0.0
        return time.monotonic() - min(self._started_at.values())

    def fail_queued(self, error: Exception) -> int:
        """Fail every item not yet handed to the model (a stuck model: let callers go elsewhere)."""
        queued, self._queue = self._queue, []
        self._fail(queued, error)
        return len(queued)

    def start(self) -> None:
        self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-batcher")

    async def submit(
        self, payloads: Sequence[T], lengths: Sequence[int], deadline_s: float | None = None, bulk: bool = False,
        partial: bool = False,
    ) -> Submission[R]:
        """Queue items (``lengths`` in tokens) and wait for all their results.

        ``deadline_s`` is on the ``time.monotonic()`` clock; ``bulk`` items yield to interactive ones.
        ``partial``: when the deadline leaves some items uncomputed, return the others (None in their
        places) rather than DeadlineExceeded, so the model time spent on them is not thrown away; with
        none computed it is still DeadlineExceeded.
        """
        if not payloads:
            return Submission(values=[], queue_ms=0.0, compute_ms=0.0)
        if self._closing or self._runner is None:
            raise NotReady(f"{self.name} is not accepting work (starting or shutting down)")
        # Each lane has its own bound: a backlog of writes never sheds a query, nor queries a write.
        queued = sum(1 for item in self._queue if item.bulk == bulk)
        if queued + len(payloads) > self.policy.max_queue_items:
            self.stats.shed_items += len(payloads)
            lane = "bulk items" if bulk else "items"
            raise Overloaded(
                f"{self.name} is overloaded: {queued} {lane} queued, limit "
                f"{self.policy.max_queue_items}; retry later or on another replica"
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        traced = tracing.current_context()
        items = [_Item(p, n, loop.create_future(), now, deadline_s, bulk, trace=traced)
                 for p, n in zip(payloads, lengths)]
        self._queue.extend(items)
        self._wakeup.set()
        futures = [item.future for item in items]
        timeout = None if deadline_s is None else max(0.0, deadline_s - now)
        try:
            await asyncio.wait(futures, timeout=timeout)
        finally:
            # Cancelled or timed out: unresolved items are skipped when their batch forms.
            for future in futures:
                future.cancel()
        # After the cancel above a future is cancelled (never computed in time), failed or holds a result.
        failures = [i.future.exception() for i in items if not i.future.cancelled() and i.future.exception()]
        if broken := [e for e in failures if not isinstance(e, DeadlineExceeded)]:
            raise broken[0]
        computed = [i for i in items if not i.future.cancelled() and not i.future.exception()]
        if len(computed) < len(items) and not (partial and computed):
            raise failures[0] if failures else DeadlineExceeded(
                f"{self.name}: deadline passed with {len(items) - len(computed)} items not yet computed")
        if traced is not None:
            tracing.record("queue wait", now, min(i.dispatched_s for i in computed),
                           {"twostage.batcher": self.name, "twostage.items": len(items)})
        return Submission(
            values=[None if i.future.cancelled() or i.future.exception() else i.future.result() for i in items],
            queue_ms=1000 * (min(i.dispatched_s for i in computed) - min(i.enqueued_s for i in computed)),
            compute_ms=1000 * (max(i.done_s for i in computed) - min(i.dispatched_s for i in computed)),
        )

    async def close(self, drain: bool = True) -> None:
        """Refuse new work; finish queued work (or fail it when not draining)."""
        self._closing = True
        if not drain:
            self._fail(self._queue, NotReady(f"{self.name} shut down before this item was computed"))
            self._queue.clear()
        self._wakeup.set()
        if self._runner is not None:
            await self._runner
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            wait_s = self._seconds_until_due()
            if wait_s > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait_s)
                except TimeoutError:
                    pass
                continue
            if self._in_flight and self._lane([i for i in self._queue if not i.future.done()], time.monotonic()):
                # Bulk work is never formed ahead: a query that arrives waits for one small batch at most.
                self._wakeup.clear()
                woken = asyncio.ensure_future(self._wakeup.wait())
                await asyncio.wait([*self._in_flight, woken], return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                continue
            await self._slots.acquire()
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._in_flight.add(task)
            self._started_at[task] = time.monotonic()
            task.add_done_callback(self._in_flight.discard)
            task.add_done_callback(lambda t: self._started_at.pop(t, None))

    def _seconds_until_due(self) -> float:
        """0 when a batch should run now, else how long until the oldest item is due."""
        if self._closing or len(self._queue) >= self.policy.max_batch_size:
            return 0.0
        if sum(item.length for item in self._queue if not item.bulk) >= self.policy.max_batch_tokens:
            return 0.0
        if sum(item.length for item in self._queue if item.bulk) >= self.policy.bulk_max_batch_tokens:
            return 0.0
        oldest = min(item.enqueued_s for item in self._queue)
        return oldest + self.policy.max_wait_ms / 1000 - time.monotonic()

    def _take_batch(self) -> list[_Item]:
        """Remove and return the length-sorted batch holding the oldest live item."""
        now = time.monotonic()
        live = []
        for item in self._queue:
            if item.future.done():
                continue
            if item.deadline_s is not None and item.deadline_s <= now:
                self.stats.expired_items += 1
                item.future.set_exception(DeadlineExceeded(f"{self.name}: deadline passed while queued"))
                continue
            live.append(item)
        if not live:
            self._queue = []
            return []
        lane = self._lane(live, now)
        if lane:
            self._last_bulk_s = now
        candidates = sorted((item for item in live if item.bulk == lane), key=_urgency)
        token_budget = self.policy.bulk_max_batch_tokens if lane else self.policy.max_batch_tokens
        due = _due(candidates[0])
        first_due = [item for item in candidates if _due(item) == due]
        plans = plan_batches([item.length for item in first_due], self.policy.max_batch_size, token_budget)
        batch = [first_due[i] for i in next(plan for plan in plans if 0 in plan)]
        longest = max(item.length for item in batch)
        for item in candidates[len(first_due):]:
            if len(batch) >= self.policy.max_batch_size:
                break
            if (len(batch) + 1) * max(longest, item.length) <= token_budget:
                batch.append(item)
                longest = max(longest, item.length)
        taken = set(map(id, batch))
        self._queue = [item for item in live if id(item) not in taken]
        return batch

    def _lane(self, live: list[_Item], now: float) -> bool:
        """True for the bulk lane: when nothing interactive waits, or bulk has waited too long."""
        if not live:
            return False
        bulk = [item.enqueued_s for item in live if item.bulk]
        if not bulk:
            return False
        if len(bulk) == len(live):
            return True
        # Starved: queries have had the model to themselves for bulk_max_wait_ms. One bulk batch, then queries again.
        bound = self.policy.bulk_max_wait_ms / 1000
        return now - min(bulk) > bound and now - self._last_bulk_s > bound

    async def _execute(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        probe = False
        try:
            started, computed, deferred, results, probe = await loop.run_in_executor(
                self._executor, self._timed_compute, batch)
            if deferred:  # on time alone but not in this batch: back in the queue, keeping their place by urgency
                self._queue.extend(deferred)
                self._wakeup.set()
            if len(computed) + len(deferred) < len(batch):
                late = [item for item in batch if item not in computed and item not in deferred]
                self.stats.expired_items += len(late)
                self._fail(late, DeadlineExceeded(f"{self.name}: deadline would pass before this item was computed, "
                                                  "even in a batch of its own"))
            batch = computed
            if not batch:
                return
            # Time spent behind the batch ahead (pipelining) is queueing, not model time.
            for item in batch:
                item.dispatched_s = started
            if len(results) != len(batch):
                raise RuntimeError(f"model returned {len(results)} results for {len(batch)} items")
        except Exception as error:  # every caller must hear of it
            self.stats.failed_batches += 1
            log.exception("%s: batch of %d failed", self.name, len(batch))
            failure = error if isinstance(error, TwostageError) else ModelFailure(
                f"{self.name}: model failed on a batch of {len(batch)} items: {error}"
            )
            self._fail(batch, failure)
            return
        finally:
            self._slots.release()
        done = time.monotonic()
        for item, result in zip(batch, results):
            item.done_s = done
            if not item.future.done():
                item.future.set_result(result)
        traced = [item.trace for item in batch if item.trace is not None] if tracing.enabled else None
        span = tracing.batch_span("model batch", traced, started) if traced else None
        if span is not None and span.is_recording():
            span.set_attributes({"twostage.batcher": self.name, "twostage.batch.size": len(batch),
                                 "twostage.batch.real_tokens": sum(item.length for item in batch),
                                 "twostage.batch.padded_tokens": len(batch) * max(item.length for item in batch),
                                 "twostage.batch.bulk": batch[0].bulk})
        with tracing.use(span):  # the observers' exemplars point at this batch
            self._record(batch, started, done, probe)
        tracing.end(span, done)

    def _timed_compute(self, batch: list[_Item]) -> tuple[float, list[_Item], list[_Item], list, bool]:
        """Runs on the model's thread, once the batch ahead is done: leaves out items whose caller has gone
        or that would finish after their deadline even computed alone (wasted work the callers behind would
        wait for). The rest, most urgent first, join the batch while everyone in it is still predicted on
        time; those that would make it late are deferred to a later batch, never refused for others' cost.

        Never stuck: when every item would be left out as late alone and the lane has run nothing for
        STALE_S, the one with the latest deadline is computed anyway (a probe), and its time replaces the
        lane's estimate (``_record``). One slow batch, such as a new shape's first run on a busy host, would
        otherwise have every later item refused, and a refused item teaches nothing.
        Returns when the model began, the items computed, those deferred, the results and whether it probed."""
        started = time.monotonic()
        lane = batch[0].bulk
        computed: list[_Item] = []
        deferred: list[_Item] = []
        late_alone: list[_Item] = []
        for item in sorted((i for i in batch if not i.future.done()), key=_urgency):
            if not self._on_time(started, [item]):
                late_alone.append(item)
            elif self._on_time(started, [*computed, item]):
                computed.append(item)
            else:
                deferred.append(item)
        probe = False
        hopeful = [i for i in late_alone if i.deadline_s is None or i.deadline_s > started]
        if not computed and hopeful and started - self._lane_done_s[lane] >= STALE_S:
            computed, probe = [max(hopeful, key=_due)], True
        kept = set(map(id, computed))
        computed = [i for i in batch if id(i) in kept]  # in the batch's own (length-sorted) order
        results = self._compute([i.payload for i in computed]) if computed else []
        if computed:
            self._lane_done_s[lane] = time.monotonic()  # here, on the model's thread: the next batch reads it
        return started, computed, deferred, results, probe

    def _on_time(self, started: float, batch: list[_Item]) -> bool:
        finish_s = started + self.predict_ms(batch) / 1000
        return all(item.deadline_s is None or item.deadline_s > finish_s for item in batch)

    def predict_ms(self, batch: list[_Item]) -> float:
        """How long the model will take over this batch, from its own lane's batches: by its padded tokens
        once batches of different shapes have been seen (a batch of long items takes longer than the average
        batch, and an item predicted on time must finish on time), else by the average per item; 0 with no
        batch of that lane seen yet (nothing to refuse on)."""
        bulk = batch[0].bulk
        cost, per_item = (self.bulk_batch_cost, self.bulk_ms_per_item) if bulk else (self.batch_cost, self.ms_per_item)
        predicted = cost.predict(len(batch) * max(item.length for item in batch))
        return per_item * len(batch) if predicted is None else predicted

    def _record(self, batch: list[_Item], started: float, done: float, probe: bool = False) -> None:
        if probe:  # the estimate it ran against had refused everything: forget it, this batch is the news
            if batch[0].bulk:
                self.bulk_ms_per_item, self.bulk_batch_cost = 0.0, BatchCost()
            else:
                self.ms_per_item, self.batch_cost = 0.0, BatchCost()
        real = sum(item.length for item in batch)
        padded = len(batch) * max(item.length for item in batch)
        stats = self.stats
        stats.batches += 1
        stats.items += len(batch)
        stats.real_tokens += real
        stats.padded_tokens += padded
        stats.batch_sizes[len(batch)] += 1
        sample = 1000 * (done - started) / len(batch)
        if batch[0].bulk:
            previous = self.bulk_ms_per_item
            self.bulk_ms_per_item = sample if not previous else previous + 0.2 * (sample - previous)
            self.bulk_batch_cost.add(padded, 1000 * (done - started))
        else:
            self.ms_per_item = sample if not self.ms_per_item else self.ms_per_item + 0.2 * (sample - self.ms_per_item)
            self.batch_cost.add(padded, 1000 * (done - started))
        waits = [started - item.enqueued_s for item in batch]
        for observer in self._observers:
            observer(len(batch), real, padded, waits, done - started)

    @staticmethod
    def _fail(items: list[_Item], error: Exception) -> None:
        now = time.monotonic()
        for item in items:
            item.done_s = now
            if not item.future.done():
                item.future.set_exception(error)
