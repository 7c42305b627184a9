"""The rerank tier as the gateway sees it: replicas with a live cost model.

A replica is modelled as a queue: service time per pair (model time, apart
from the replica's queueing) plus the work ahead of a new request, counted
once: what this gateway has sent and is predicted not yet done (it drains as
the replica works on it, so a long request half done counts half), what it
gave up at a deadline and the replica may still be computing, plus what other
callers had queued there at its last answer. The pool answers "how many of
these candidates fit in this budget" and spreads one query's pairs over the
healthy replicas in parallel, so that all are predicted to finish together.

Service time depends on a pair's length. A replica publishes its cost model
in Info (``PairCost``: a fixed part and a part per token, fitted when its
model loaded), and a pair's tokens are estimated from its text (characters
over the replica's published characters per token, the query cut at half the
window, all cut at ``max_length``): a short document is planned at its own
price, not a long one's. Live answers correct the model by one factor,
``cost_ratio``, which the replica measures batch by batch against the same
model (its own model time over the model's prediction for each batch's pairs,
by their own lengths): one factor scales every length alike, so answers on
long documents do not make short ones look dear, and pairs of other callers
batched with ours do not blur it. A replica that publishes no model (or
before its Info is read) is planned at one cost per pair, ``ms_per_pair``,
its recent average as its answers report it (``Cost.ms_per_item``);
``ms_per_pair`` also prices other callers' queued pairs, whose lengths are
unknown. The published model is re-read on a slow period, and soon after an
answer whose model time is more than ``DISAGREEMENT`` times off the
prediction, or one that came back late (see ``refresh_wanted``); while no
replica's cost has been confirmed by live traffic, a pair goes now and then
whatever the model says (``probe``).

Three cost models meet here. In the replica, the batcher
(twostage/batching.py) predicts a batch's model time from its padded tokens
(``BatchCost``) and keeps a running model time per pair (``ms_per_item``),
with which it refuses pairs that would be late. The replica reports that
ms-per-pair estimate in every answer's typed ``Cost`` (reply.cost), with the
request's queue wait and its service (model) time; its Info publishes the
cost by length (``PairCost``) and ``cost_ratio``, its live batches' model
time over what that model predicted for them. The gateway adopts the
reported estimate as the replica's rate (``ms_per_pair``), corrects the
published model for the difference between predicted and reported service
time (``cost_ratio``, and a fresh read of Info when an answer's service time
is ``DISAGREEMENT`` times off its prediction), and measures what else a
request takes, tokenising and transport, as its overhead: elapsed minus
queue minus service. Answers' ``timings_ms`` are diagnostics, passed on
and never modelled.

Only a replica's own faults count against it (outlier ejection as in
Envoy): UNAVAILABLE, INTERNAL, NOT_SERVING. A caller's mistake
(INVALID_ARGUMENT) is the caller's answer and is never retried elsewhere;
shed load (RESOURCE_EXHAUSTED) and a deadline are not faults. A slice that
fails for the replica's sake is retried on another replica while time
remains. A replica that fails ``eject_after_failures`` times in a row is
ejected for ``eject_s``, then returns once a health check says SERVING; one
whose health says NOT_SERVING is out until it says SERVING, and one that stays
silent (UNKNOWN) is out after a few checks in a row. Members come and
go with ``update_members`` (targets resolved by twostage/membership.py, applied by gateway/lifecycle.py).
"""

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.clients import RerankClient
from gateway.metrics import EJECTIONS, REPLICAS
from twostage import errors
from twostage.batching import PairCost
from twostage.probe import Health

log = logging.getLogger(__name__)
# An answer whose model time is this many times off (either way) the prediction asks for the replica's
# published cost model to be read again soon, not only on the slow period.
DISAGREEMENT = 3.0
PROBE_INTERVAL_S = 5.0  # at most one probe this often while no replica's cost is confirmed (RerankPool.probe)


@dataclass
class Replica:
    client: RerankClient
    ms_per_pair: float  # service time per pair when there is no cost model; other callers' pairs always
    cost: PairCost | None = None  # the cost model the replica published (Info): a pair's cost by its length
    cost_ratio: float = 1.0  # the replica's live model time over what ``cost`` predicts (its answers say)
    outstanding_pairs: int = 0  # this gateway's pairs sent and not yet answered
    outstanding_ms: float = 0.0  # their predicted service time
    progress_since_s: float = 0.0  # since when the replica has been working on our outstanding pairs
    overhead_ms: float = 0.0  # per request, outside the model: tokenising, transport (learned)
    others_pairs: int = 0  # pairs other callers had queued there, as of its last answer
    others_seen_s: float = 0.0
    consecutive_failures: int = 0
    ejected_until_s: float = 0.0
    serving: bool = True
    missed_health_checks: int = 0
    health: Health = Health.UNKNOWN  # what its last health check found (UNKNOWN also before the first)
    pairs_scored: int = 0
    unavailable_since_s: float | None = None  # out of rotation since (time.monotonic()); None while available

    def note_availability(self, now: float) -> None:
        if self.available():
            self.unavailable_since_s = None
        elif self.unavailable_since_s is None:
            self.unavailable_since_s = now
    abandoned_ms: float = 0.0  # work given up at the deadline that the replica may still be doing (see abandon)
    abandoned_s: float = 0.0
    cost_confirmed: bool = False  # live traffic has corrected its cost (a ratio from it, or pairs answered)

    @property
    def target(self) -> str:
        return self.client.target

    def available(self) -> bool:
        # Ejected until eject_s has passed and a health check has said SERVING since (check_health clears it).
        return self.serving and not self.ejected_until_s

    def pair_ms(self, query: str, document: str) -> float:
        """Predicted service time of one pair: by its estimated length under the published model, corrected
        by the live ratio; without a model, the replica's cost per pair."""
        if self.cost is None:
            return self.ms_per_pair
        return self.cost_ratio * self.cost.pair_ms(self.cost.estimate_tokens(len(query), len(document)))

    def pairs_ms(self, query: str, documents: Sequence[str]) -> list[float]:
        if self.cost is None:
            return [self.ms_per_pair] * len(documents)
        query_chars = len(query)
        return [self.cost_ratio * self.cost.pair_ms(self.cost.estimate_tokens(query_chars, len(d)))
                for d in documents]

    def backlog_ms(self, now: float) -> float:
        """Work ahead of a new request, each pair counted once: what is left of ours, plus what others
        had queued at the last answer (forgotten after a second, as it drains)."""
        others = self.others_pairs if now - self.others_seen_s < 1.0 else 0
        ours = self.outstanding_ms - 1000 * (now - self.progress_since_s) if self.outstanding_pairs else 0.0
        return max(0.0, ours) + self.abandoned_left_ms(now) + others * self.ms_per_pair

    def abandoned_left_ms(self, now: float) -> float:
        return max(0.0, self.abandoned_ms - 1000 * (now - self.abandoned_s))

    def abandon(self, work_ms: float, now: float) -> None:
        """Pairs given up at their deadline may still be in the replica's model (a batch, once begun, runs to its
        end): their work stays ahead of new requests until predicted done, or the next search, planned as if
        the model were free, would queue behind it and be late in turn."""
        self.abandoned_ms, self.abandoned_s = self.abandoned_left_ms(now) + work_ms, now

    def finish_ms(self, work_ms: float, now: float | None = None) -> float:
        """When work of ``work_ms`` service time sent now would be answered: overhead, the backlog, then it."""
        now = time.monotonic() if now is None else now
        return self.overhead_ms + self.backlog_ms(now) + work_ms

    def predict_ms(self, pairs: int, now: float | None = None) -> float:
        """When ``pairs`` of the replica's cost per pair (``ms_per_pair``) sent now would be answered."""
        return self.finish_ms(pairs * self.ms_per_pair, now)

    def sent(self, pairs: int, work_ms: float, now: float) -> None:
        if not self.outstanding_pairs:
            self.progress_since_s = now
            self.outstanding_ms = 0.0
        self.outstanding_pairs += pairs
        self.outstanding_ms += work_ms

    def answered(self, pairs: int, work_ms: float, now: float) -> None:
        # Counted afresh from here: errors in the estimate never accumulate.
        self.outstanding_pairs -= pairs
        self.outstanding_ms = max(0.0, self.outstanding_ms - work_ms) if self.outstanding_pairs else 0.0
        self.progress_since_s = now

    def adopt_published(self, cost: PairCost | None, cost_ratio: float, ms_per_pair: float) -> None:
        """Take what the replica's Info says: its cost model and live ratio; its cost per pair only until its
        answers have said (theirs is the recent average of real pairs)."""
        if cost is not None:
            self.cost = cost
        if cost_ratio > 0:
            self.cost_ratio = cost_ratio
            self.cost_confirmed = True
        if ms_per_pair > 0 and not self.pairs_scored:
            self.ms_per_pair = ms_per_pair


@dataclass
class RerankOutcome:
    scores: dict[int, float] = field(default_factory=dict)  # candidate position -> score
    timings_ms: dict[str, float] = field(default_factory=dict)
    failed_slices: int = 0
    error: errors.TwostageError | None = None
    query_truncated: bool = False
    cached: int = 0  # pairs a replica answered from its score cache
    tokens: int = 0  # tokens the replicas read for the pairs scored


def is_callers_mistake(error: Exception) -> bool:
    return isinstance(error, errors.CALLERS_MISTAKES)


def is_replica_fault(error: Exception) -> bool:
    """Only what says something about the replica: unreachable, not serving, or broken."""
    not_the_replicas = errors.Overloaded | errors.DeadlineExceeded | errors.Cancelled
    return not (is_callers_mistake(error) or isinstance(error, not_the_replicas))


class RerankPool:
    def __init__(
        self,
        clients: list[RerankClient],
        initial_ms_per_pair: float,
        ewma_weight: float = 0.3,
        eject_after_failures: int = 3,
        eject_s: float = 5.0,
        slice_ms: float = 0.0,
        affinity: bool = False,
    ):
        self.replicas = [Replica(c, initial_ms_per_pair) for c in clients]
        self.initial_ms_per_pair = initial_ms_per_pair
        self.ewma_weight = ewma_weight
        self.eject_after_failures = eject_after_failures
        self.eject_s = eject_s
        self.slice_ms = slice_ms
        self.affinity = affinity
        # Set when a replica fails as an unreachable one would: membership is re-resolved early.
        self.unreachable = asyncio.Event()
        # Set when an answer's model time is DISAGREEMENT times off the prediction, when pairs come back late,
        # and when a probe goes: the published costs are read again soon (gateway/lifecycle.py).
        self.refresh_wanted = asyncio.Event()
        self.last_probe_s = 0.0  # when the last probe went (see probe)
        self._retiring: set[asyncio.Task] = set()
        REPLICAS.register(self)

    def update_members(self, addresses: list[str], make_client) -> tuple[list[str], list[str]]:
        """Follow the resolved addresses: new ones join (with the initial cost), gone ones leave once
        their in-flight pairs finish. Returns (added, removed)."""
        current = {r.target: r for r in self.replicas}
        wanted = set(addresses)
        added = [a for a in addresses if a not in current]
        removed = [r for r in self.replicas if r.target not in wanted]
        if not added and not removed:
            return [], []
        self.replicas = [current.get(a) or Replica(make_client(a), self.initial_ms_per_pair) for a in addresses]
        for replica in removed:
            task = asyncio.get_running_loop().create_task(self._retire(replica))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return added, [r.target for r in removed]

    @staticmethod
    async def _retire(replica: Replica, patience_s: float = 60.0) -> None:
        deadline = time.monotonic() + patience_s
        while replica.outstanding_pairs and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await replica.client.close()

    async def close(self) -> None:
        await asyncio.gather(*(r.client.close() for r in self.replicas), *self._retiring, return_exceptions=True)

    def available(self) -> list[Replica]:
        return [r for r in self.replicas if r.available()]

    def affordable_pairs(self, budget_ms: float, headroom: float, query: str = "",
                         documents: Sequence[str] | None = None, idle: bool = False) -> int:
        """How many pairs the available replicas can score together within ``budget_ms`` (the inverse of the
        prediction, times ``headroom``): the longest prefix of ``documents``, each pair priced by its length;
        without documents, pairs at each replica's cost per pair. ``idle``: as if nothing were queued ahead
        (what the request itself costs, whatever the load)."""
        now = time.monotonic()
        replicas = self.available()
        usable = [max(0.0, budget_ms / headroom - (r.overhead_ms if idle else r.finish_ms(0.0, now)))
                  for r in replicas]
        if documents is None:
            return int(sum(u / r.ms_per_pair for u, r in zip(usable, replicas)))
        costs = [r.pairs_ms(query, documents) for r in replicas]
        totals = [0.0] * len(replicas)
        for depth in range(len(documents)):
            totals = [total + cost[depth] for total, cost in zip(totals, costs)]
            # The prefix fits when, shared by speed, each replica's part fits in what it has left.
            if sum(u / total for u, total in zip(usable, totals) if total > 0) < 1 - 1e-9:
                return depth
        return len(documents)

    def unconfirmed(self) -> bool:
        """True while no available replica's cost has been confirmed by live traffic (see ``probe``)."""
        replicas = self.available()
        return bool(replicas) and not any(r.cost_confirmed for r in replicas)

    def probe(self, now: float | None = None) -> bool:
        """Whether to send one pair that the cost model says does not fit (a yes is counted as a probe sent
        now): while no replica's cost has been confirmed by live traffic, at most once every
        ``PROBE_INTERVAL_S`` and never while pairs of ours are in flight. The figures a replica published at
        load are then all there is to plan with, and if they are too high (measured while other work held the
        CPU) no budget would ever send the pair that corrects them. A probe's answer carries the live ratio;
        should it come back late, the replica has still measured its batch, and its Info says so (read again
        every second until then, see ``awaiting_confirmation``)."""
        now = time.monotonic() if now is None else now
        if not self.unconfirmed() or now - self.last_probe_s < PROBE_INTERVAL_S:
            return False
        if any(r.outstanding_pairs for r in self.available()):
            return False
        self.last_probe_s = now
        self.refresh_wanted.set()  # from now on the published costs are read every second until confirmed
        return True

    def awaiting_confirmation(self) -> bool:
        """A probe went out and no replica's cost has been confirmed since."""
        return bool(self.last_probe_s) and self.unconfirmed()

    def single_pair_ms(self, query: str, document: str) -> float:
        """The soonest one pair could be done by the model alone: the queue ahead and its own service time
        on the quickest replica, with neither headroom nor per-request overhead (inf with none available)."""
        now = time.monotonic()
        return min((r.backlog_ms(now) + r.pair_ms(query, document) for r in self.available()), default=math.inf)

    def backlog_s(self) -> float:
        """How long the work queued ahead on the available replicas takes to drain (the least loaded one's)."""
        now = time.monotonic()
        return min((r.backlog_ms(now) for r in self.available()), default=0.0) / 1000

    def _shares(self, count: int, replicas: list[Replica], per_pair_ms: list[float]) -> list[float]:
        """Pairs each replica should take so that all are predicted to finish together (``per_pair_ms``:
        each replica's mean service time over these pairs)."""
        now = time.monotonic()
        speeds = [1 / ms for ms in per_pair_ms]
        backlogs = [r.backlog_ms(now) / ms for r, ms in zip(replicas, per_pair_ms)]
        horizon = (count + sum(backlogs)) / sum(speeds)
        return [max(0.0, horizon * s - b) for b, s in zip(backlogs, speeds)]

    def _split(self, query: str, documents: list[str], replicas: list[Replica],
               time_left_ms: float = math.inf) -> list[tuple[Replica, list[int]]]:
        """Which replica scores which document, as slices: contiguous runs sized by the replicas' shares, or
        with ``affinity`` each document where a rendezvous hash of its text, weighted by the shares, sends
        it (the same document keeps going to the same replica, and its cache). A replica's share is cut into
        slices of about ``slice_ms`` only when it is predicted to take over a quarter of ``time_left_ms``."""
        per_pair_ms = [max(sum(costs) / len(costs), 1e-6) if costs else r.ms_per_pair
                       for r, costs in ((r, r.pairs_ms(query, documents)) for r in replicas)]
        shares = self._shares(len(documents), replicas, per_pair_ms)
        if len(replicas) == 1 or not self.affinity:
            sizes = _apportion(len(documents), shares)
            assigned, start = [], 0
            for size in sizes:
                assigned.append(list(range(start, start + size)))
                start += size
        else:
            # Weights in steps of a tenth of the largest: measured speeds jitter from request to request, and
            # every change of weight would move some documents away from their cached scores.
            top = max(shares)
            weights = [max(round(10 * share / top), 1) / 10 if share > 0 else 0.0 for share in shares]
            assigned = [[] for _ in replicas]
            for i, document in enumerate(documents):
                assigned[_rendezvous(document, replicas, weights)].append(i)
        slices = []
        now = time.monotonic()
        for replica, ms, positions in zip(replicas, per_pair_ms, assigned):
            # Several smaller requests rather than one: if the tail runs late, only the tail is lost. With time to
            # spare (the share predicted done within a quarter of the time left: wrong fourfold before it is late)
            # one request saves the others' round trips, each of which costs both ends about as much as a short
            # pair scored from the cache. A budget that binds is mostly sliced (a top-up's first call takes up to
            # half the time, so it goes whole only below about a quarter). One request is all or nothing at the
            # deadline: a late second server batch loses the first batch's pairs too, where slices keep them.
            tight = self.slice_ms and replica.finish_ms(ms * len(positions), now) > time_left_ms / 4
            most = max(1, int(self.slice_ms / ms)) if tight else max(len(positions), 1)
            slices += [(replica, positions[first:first + most]) for first in range(0, len(positions), most)]
        return slices

    def _observe(self, replica: Replica, pairs: int, reply, elapsed_ms: float, predicted_ms: float) -> None:
        """Learn service time and overhead from the cost the replica reports (``reply.cost``), apart from its
        queueing. ``predicted_ms``: the service time predicted for the ``pairs`` it scored."""
        replica.consecutive_failures = 0
        replica.pairs_scored += pairs
        replica.others_pairs = max(0, reply.queue_items - replica.outstanding_pairs)
        replica.others_seen_s = time.monotonic()
        if reply.cost_ratio > 0:
            replica.cost_ratio = reply.cost_ratio
        cost = reply.cost
        if cost is None:  # a replica older than the Cost message: its published cost (Info) stands, nothing learnt
            return
        if cost.ms_per_item:
            replica.ms_per_pair = cost.ms_per_item  # the replica's own recent average
        elif cost.service_ms:
            replica.ms_per_pair += self.ewma_weight * (cost.service_ms / max(pairs, 1) - replica.ms_per_pair)
        replica.cost_confirmed = True
        computed = pairs - reply.cached
        if computed > 0 and pairs and cost.service_ms and predicted_ms > 0:
            off = cost.service_ms / (predicted_ms * computed / pairs)
            if not 1 / DISAGREEMENT <= off <= DISAGREEMENT:
                self.refresh_wanted.set()
        overhead = elapsed_ms - cost.queue_ms - cost.service_ms
        replica.overhead_ms += self.ewma_weight * (max(overhead, 0.0) - replica.overhead_ms)

    def _fail(self, replica: Replica, error: Exception) -> None:
        if isinstance(error, errors.DeadlineExceeded):
            # Late is not broken. But pairs planned on time came back late: the prediction was off, and the
            # replica (which measured any batch it ran for them, or refused them as late by its own costs) knows.
            self.refresh_wanted.set()
            return
        if not is_replica_fault(error):
            return
        if isinstance(error, errors.Unavailable | errors.NotReady):
            self.unreachable.set()
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.eject_after_failures:
            if not replica.ejected_until_s:
                EJECTIONS.labels("rerank").inc()
            replica.ejected_until_s = time.monotonic() + self.eject_s
            replica.note_availability(time.monotonic())
            log.warning("ejecting rerank replica %s for %.0f s: %s", replica.target, self.eject_s, error)

    async def _score_slice(self, replica, query, documents, positions, deadline_s, request_id, outcome,
                           refuse_truncation: bool = False) -> bool:
        start = time.monotonic()
        texts = [documents[i] for i in positions]
        costs = replica.pairs_ms(query, texts)
        replica.sent(len(positions), sum(costs), start)
        try:
            reply = await replica.client.rerank(
                query, texts, deadline_s - start, request_id,
                **({"refuse_truncation": True} if refuse_truncation else {}),
            )
        except errors.TwostageError as error:
            self._fail(replica, error)
            outcome.error = error
            if isinstance(error, errors.DeadlineExceeded) and time.monotonic() >= deadline_s - 0.01:
                replica.abandon(sum(costs), time.monotonic())  # not refused early: it may be computing them
            return False
        finally:
            replica.answered(len(positions), sum(costs), time.monotonic())
        scored = sum(costs[local] for local in reply.scores) if reply.scores else 0.0
        if reply.unscored:
            replica.abandon(sum(costs) - scored, time.monotonic())
        self._observe(replica, len(positions) - reply.unscored, reply, 1000 * (time.monotonic() - start), scored)
        outcome.query_truncated |= reply.query_truncated
        outcome.cached += reply.cached
        outcome.tokens += reply.tokens
        for local, score in reply.scores.items():
            outcome.scores[positions[local]] = score
        if reply.unscored:
            # The replica scored what it could before the deadline: keep that, and stop asking for more.
            outcome.error = errors.DeadlineExceeded(
                f"rerank replica {replica.target}: {reply.unscored} of {len(positions)} pairs not scored in time")
        for name, ms in reply.timings_ms.items():
            outcome.timings_ms[name] = max(ms, outcome.timings_ms.get(name, 0.0))
        return True

    async def rerank(self, query: str, documents: list[str], deadline_s: float, request_id: str,
                     refuse_truncation: bool = False) -> RerankOutcome:
        """Score ``documents`` across the available replicas; retry failed slices elsewhere. With
        ``refuse_truncation`` a query or document the model would cut is TooLong."""
        outcome = RerankOutcome()
        pending = list(range(len(documents)))
        tried: set[str] = set()
        while pending and time.monotonic() < deadline_s:
            replicas = [r for r in self.available() if r.target not in tried] or []
            if not replicas:
                break
            slices = self._split(query, [documents[i] for i in pending], replicas,
                                 1000 * (deadline_s - time.monotonic()))
            calls = [self._score_slice(r, query, documents, [pending[i] for i in span], deadline_s, request_id,
                                       outcome, refuse_truncation)
                     for r, span in slices]
            # One call is awaited as it is: a task for it would cost a turn of the event loop.
            results = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
            failed = [pending[i] for (r, span), ok in zip(slices, results) if not ok for i in span]
            outcome.failed_slices += sum(not ok for ok in results)
            tried.update(r.target for (r, _), ok in zip(slices, results) if not ok)
            pending = failed
            # A deadline ends the attempt; a caller's mistake would be the same on every replica.
            if isinstance(outcome.error, errors.DeadlineExceeded) or (
                outcome.error is not None and is_callers_mistake(outcome.error)
            ):
                break
        if pending and not outcome.error:
            # Time ran out before a replica was asked (a budget spent on the way here) is a deadline, not an outage.
            outcome.error = (errors.DeadlineExceeded("no time was left to ask a rerank replica")
                             if time.monotonic() >= deadline_s else errors.Unavailable("no rerank replica available"))
        return outcome

    async def check_health(self, timeout_s: float, misses_to_eject: int = 3) -> None:
        """One round of health checks. NOT_SERVING takes a replica out at once; silence only after
        ``misses_to_eject`` rounds in a row (a busy CPU can delay one answer). An ejected replica
        returns once it reports SERVING."""
        replicas = list(self.replicas)  # membership may change while the checks are out
        found = await asyncio.gather(*(r.client.health_status(timeout_s) for r in replicas))
        for replica, health in zip(replicas, found):
            replica.health = health
            silent = health is Health.UNKNOWN
            replica.missed_health_checks = replica.missed_health_checks + 1 if silent else 0
            serving = replica.missed_health_checks < misses_to_eject if silent else health is Health.SERVING
            if serving and not replica.serving:
                log.info("rerank replica %s is serving again", replica.target)
            if health is Health.SERVING and replica.ejected_until_s and time.monotonic() >= replica.ejected_until_s:
                log.info("rerank replica %s returns after its ejection", replica.target)
                replica.ejected_until_s = 0.0
                replica.consecutive_failures = 0
            replica.serving = serving
            replica.note_availability(time.monotonic())

    async def wait_for_a_replica(self, timeout_s: float, period_s: float = 0.2) -> bool:
        """At start: until one replica answers SERVING (replicas may still be loading), or timeout.
        Silence, which later rounds tolerate from a busy replica, does not count here."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.check_health(timeout_s=period_s * 5)
            if any(r.health is Health.SERVING for r in self.replicas) or time.monotonic() >= deadline:
                return any(r.health is Health.SERVING for r in self.replicas)
            await asyncio.sleep(period_s)

    async def watch_health(self, stop: asyncio.Event, period_s: float = 1.0) -> None:
        while not stop.is_set():
            await self.check_health(timeout_s=2 * period_s)
            try:
                await asyncio.wait_for(stop.wait(), period_s)
            except TimeoutError:
                pass


def _apportion(count: int, shares: list[float]) -> list[int]:
    """``count`` split in proportion to ``shares``, largest remainders first."""
    scale = count / sum(shares) if sum(shares) > 0 else 0
    sizes = [int(share * scale) for share in shares]
    for i in sorted(range(len(sizes)), key=lambda i: -shares[i])[: count - sum(sizes)]:
        sizes[i] += 1
    return sizes


def _rendezvous(document: str, replicas: list[Replica], weights: list[float]) -> int:
    """Weighted rendezvous hashing: the replica with the highest weight / -ln(hash) for this document."""
    best, best_score = 0, -1.0
    for i, (replica, weight) in enumerate(zip(replicas, weights)):
        if weight <= 0:
            continue
        digest = hashlib.blake2b(f"{replica.target}\0{document}".encode(), digest_size=8).digest()
        unit = (int.from_bytes(digest, "little") + 1) / (2**64 + 1)  # in (0, 1)
        score = weight / -math.log(unit)
        if score > best_score:
            best, best_score = i, score
    return best
