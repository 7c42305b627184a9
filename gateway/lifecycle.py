"""The gateway's life: resolve the tiers, wait until it can answer, follow
membership and health while serving, close channels after draining.

The gateway reports NOT_SERVING until every recall shard has at least one
address (a gateway started before its stages waits, it does not exit). It
then waits up to ``startup_wait_s`` for a rerank replica to answer SERVING,
and serves anyway if none does: answers are recall's order, marked
``rerank_unavailable``, until one does.
"""

import asyncio
import itertools
import logging
import time

from gateway.clients import RecallClient, RerankClient, channel_options
from gateway.config import GatewaySettings
from gateway.embedding import TextEmbedder
from gateway.metrics import membership_changed
from gateway.pipeline import SearchPipeline, StageLimits
from gateway.recall_tier import RecallShard
from gateway.rerank_pool import RerankPool
from gateway.writes import DocumentRouter
from twostage.batching import DEFAULT_CHARS_PER_TOKEN, PairCost
from twostage.connect import ReloadingCredentials
from twostage.convert import hybrid_fusion_from_proto
from twostage.errors import NotReady, TwostageError
from twostage.membership import Target

log = logging.getLogger(__name__)
MIN_RESOLVE_INTERVAL_S = 0.5


class GatewayLifecycle:
    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.pipeline: SearchPipeline | None = None
        self.router: DocumentRouter | None = None
        self.embedder: TextEmbedder | None = None
        self.shards: list[RecallShard] = []
        self.pool: RerankPool | None = None
        self.limits = StageLimits()
        self._recall_targets = [Target(t) for t in settings.recall_target_list]
        self._rerank_targets = [Target(t) for t in settings.rerank_target_list]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._credentials_watch: asyncio.Task | None = None

    def ready_pipeline(self) -> SearchPipeline:
        if self.pipeline is None:
            raise NotReady("gateway is starting")
        return self.pipeline

    def ready_router(self) -> DocumentRouter:
        if self.router is None:
            raise NotReady("gateway is starting")
        return self.router

    def ready_embedder(self) -> TextEmbedder:
        if self.embedder is None:
            raise NotReady("gateway is starting")
        return self.embedder

    async def start(self) -> None:
        s = self.settings
        # Re-read when the files change (cert-manager renewals, a new stage token): no restart needed.
        credentials = ReloadingCredentials(s.tls_dir, s.stage_token_file, s.stage_tls_server_name)
        await asyncio.to_thread(credentials.load)
        self._credentials_watch = asyncio.create_task(credentials.watch(self._stop))
        numbers = itertools.count()
        options = channel_options(s.max_message_mb, s.keepalive_time_s, s.keepalive_timeout_s)

        def make_recall(address: str, name: str) -> RecallClient:
            return RecallClient(address, name, credentials, options)

        def make_rerank(address: str) -> RerankClient:
            return RerankClient(address, f"rerank replica {next(numbers)}", credentials, options)

        self._make_rerank = make_rerank
        await self._resolve_all()
        self.shards = [RecallShard(i, t, make_recall) for i, t in enumerate(self._recall_targets)]
        self.pool = RerankPool([], s.initial_rerank_ms_per_pair, eject_after_failures=s.eject_after_failures,
                               slice_ms=s.rerank_slice_ms, affinity=s.rerank_affinity,
                               eject_s=s.eject_s)
        self._apply_members()
        await self._wait_for_recall()
        await self._wait_for_rerank(s.startup_wait_s)
        await self.refresh_limits()
        await self.adopt_published_costs()
        self.pipeline = SearchPipeline(s, self.shards, self.pool, self.limits)
        self.router = DocumentRouter(self.shards, self.limits, s.write_quorum, s.request_id_ttl_s,
                                     shard_replicas=s.shard_replicas)
        self.embedder = TextEmbedder(s, self.shards, self.limits)
        self._tasks = [
            asyncio.create_task(self.pool.watch_health(self._stop, s.health_check_period_s)),
            asyncio.create_task(self._follow_membership()),
            asyncio.create_task(self._refresh_costs()),
        ]

    async def _resolve_all(self) -> None:
        await asyncio.gather(*(t.resolve() for t in [*self._recall_targets, *self._rerank_targets]))

    def _apply_members(self) -> bool:
        """Apply the last resolution to shards and pool; True if anything changed."""
        changed = False
        for shard, target in zip(self.shards, self._recall_targets):
            added, removed = shard.update_members(target.addresses)
            membership_changed("recall", len(added), len(removed))
            changed |= bool(added or removed)
        rerank_addresses = sorted({a for t in self._rerank_targets for a in t.addresses})
        added, removed = self.pool.update_members(rerank_addresses, self._make_rerank)
        membership_changed("rerank", len(added), len(removed))
        if added or removed:
            log.info("rerank replicas: +%s -%s", added or "none", removed or "none")
        return changed or bool(added or removed)

    async def _wait_for_recall(self) -> None:
        """NOT_SERVING (start has not returned) until every shard has somewhere to go."""
        waited_since = time.monotonic()
        while missing := [shard.name for shard in self.shards if not shard.replicas]:
            if time.monotonic() - waited_since > 10:
                log.warning("still waiting for %s to resolve to an address", ", ".join(missing))
                waited_since = time.monotonic()
            await asyncio.sleep(MIN_RESOLVE_INTERVAL_S)
            await self._resolve_all()
            self._apply_members()

    async def _wait_for_rerank(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.pool.wait_for_a_replica(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                log.warning("no rerank replica is serving after %.0f s; answering from recall alone", timeout_s)
                return
            await self._resolve_all()
            self._apply_members()

    async def refresh_limits(self) -> None:
        """Learn what the stages accept (best effort: until they answer, the gateway's own limits apply)."""
        recall = next((shard.replicas[0] for shard in self.shards if shard.replicas), None)
        rerank = self.pool.replicas[0].client if self.pool.replicas else None
        for client, names in (
            (recall, {"max_query_chars": "recall_max_query_chars", "max_k": "recall_max_k",
                      "max_upsert_docs": "recall_max_upsert_docs", "max_doc_chars": "recall_max_doc_chars",
                      "max_id_chars": "recall_max_id_chars", "max_embed_texts": "recall_max_embed_texts"}),
            (rerank, {"max_query_chars": "rerank_max_query_chars", "max_documents": "rerank_max_documents",
                      "max_document_chars": "rerank_max_document_chars"}),
        ):
            if client is None:
                continue
            try:
                info = await client.info(timeout_s=2.0)
            except TwostageError as error:
                log.info("limits of %s not known yet: %s", client.name, error)
                continue
            published = {limit.name: limit.value for limit in info.limits}
            self.limits.update(**{ours: published.get(theirs, 0) for theirs, ours in names.items()})
            if client is recall:
                self.limits.update(embed_model=info.model, embed_dims=info.dims)
            else:
                self.limits.update(rerank_model=info.model, rerank_max_length=info.max_length)
            if client is recall and (fusion := hybrid_fusion_from_proto(info.hybrid_fusion)):
                self.limits.recall_hybrid_fusion = fusion
                self.limits.recall_hybrid_dense_weight = info.hybrid_dense_weight
                self.limits.recall_prf_depth, self.limits.recall_prf_weight = info.prf_depth, info.prf_weight

    async def adopt_published_costs(self) -> None:
        """Take each replica's published cost model (Info: a pair's cost by its length, fitted when its model
        loaded, and the live correction), not the pessimistic default; best effort (a replica that does not
        answer keeps what it had, one that publishes no model is planned at its cost per pair)."""
        async def adopt(replica) -> None:
            try:
                info = await replica.client.info(timeout_s=2.0)
            except TwostageError as error:
                log.info("cost of %s not known yet: %s", replica.target, error)
                return
            cost = None
            if info.pair_fixed_ms > 0 or info.pair_ms_per_token > 0:
                cost = PairCost(info.pair_fixed_ms, info.pair_ms_per_token, info.max_length or 512,
                                info.chars_per_token or DEFAULT_CHARS_PER_TOKEN)
            replica.adopt_published(cost, info.cost_ratio, info.ms_per_pair)

        await asyncio.gather(*(adopt(r) for r in self.pool.replicas))

    async def _refresh_costs(self) -> None:
        """Re-read the published cost models every rerank_cost_refresh_s and soon after an answer far off its
        prediction or late (RerankPool.refresh_wanted), at most once a second; four times a second while a
        probe's outcome is awaited (the replica reports it once the probe's batch is done, a pair's time after
        it went; Info is cheap). A gateway that planned with a figure too high to send any pair would otherwise
        never see it corrected, and a replica restarted at the same address brings a new one."""
        wanted = self.pool.refresh_wanted
        while not self._stop.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in (self._stop, wanted)]
            awaiting = self.pool.awaiting_confirmation()
            period_s = 0.25 if awaiting else self.settings.rerank_cost_refresh_s
            await asyncio.wait(waits, timeout=period_s, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self._stop.is_set():
                return
            wanted.clear()
            await self.adopt_published_costs()
            try:
                await asyncio.wait_for(self._stop.wait(), 0.25 if self.pool.awaiting_confirmation() else 1.0)
            except TimeoutError:
                pass

    async def _follow_membership(self) -> None:
        """Re-resolve every resolve_period_s, and early when a member turns out unreachable."""
        hints = [self.pool.unreachable, *(shard.unreachable for shard in self.shards)]
        while not self._stop.is_set():
            waits = [asyncio.ensure_future(e.wait()) for e in [self._stop, *hints]]
            await asyncio.wait(waits, timeout=self.settings.resolve_period_s, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self._stop.is_set():
                return
            for hint in hints:
                hint.clear()
            await self._resolve_all()
            if self._apply_members():
                await self.refresh_limits()
                await self.adopt_published_costs()
            await asyncio.sleep(MIN_RESOLVE_INTERVAL_S)  # a failure storm cannot turn into a DNS storm

    async def close(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, *([self._credentials_watch] if self._credentials_watch else []),
                             return_exceptions=True)
        if self.pipeline is not None:
            await self.pipeline.close()
        elif self.pool is not None:
            await asyncio.gather(self.pool.close(), *(shard.close() for shard in self.shards))
