"""Clients for the recall and rerank tiers: the gateway's edge toward them.

They speak protos to the wire and plain values to the pipeline, and turn RPC
failures into domain errors.
"""

from dataclasses import dataclass, field

import grpc
import numpy as np

from twostage import tracing
from twostage.batching import Cost
from twostage.connect import PLAINTEXT, Credentials, ReloadingCredentials, RotatingChannel
from twostage.convert import (
    calibration_from_proto,
    cost_from_proto,
    document_from_proto,
    document_to_proto,
    filter_to_proto,
    metadata_from_proto,
    recall_mode_from_proto,
    recall_mode_to_proto,
    vector_from_bytes,
    vector_to_bytes,
    version_from_proto,
    version_to_proto,
)
from twostage.corpus import Document, MetadataValue
from twostage.feedback import Feedback
from twostage.filters import Filter
from twostage.probe import Health, channel_health
from twostage.recall_mode import RecallMode
from twostage.scoring import Calibration
from twostage.status import error_from_rpc
from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc, rerank_pb2, rerank_pb2_grpc
from twostage.versions import Version


@dataclass(slots=True)  # not frozen: made for every candidate of every search, four times faster so
class RecallCandidate:
    id: str
    title: str
    text: str
    score: float  # the recall order's score (cosine, BM25 or fused, by mode)
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    dense_score: float = 0.0
    lexical_score: float = 0.0
    vector: np.ndarray | None = field(default=None, compare=False, repr=False)  # stored vector, when asked for
    prf_dense_score: float = 0.0  # after feedback: the cosine with the refined vector (the order's dense part)


@dataclass(frozen=True)
class RecallReply:
    """One shard's answer to a search."""

    candidates: list[RecallCandidate]
    timings_ms: dict[str, float]
    mode: RecallMode | None  # the mode that answered
    calibration: Calibration | None  # the server's score calibration (None: not fitted)
    query_vector: np.ndarray | None = None  # the query's embedding, when vectors were asked for
    prf_hits: int = 0  # feedback ran from this many hits (0: it did not)
    prf_skipped: str = ""  # why feedback that was asked for did not run
    replica: str = ""  # the replica that answered


@dataclass(frozen=True)
class RerankReply:
    scores: dict[int, float]  # candidate position -> score
    timings_ms: dict[str, float]
    tokens: int
    queue_items: int
    query_truncated: bool = False
    unscored: int = 0  # documents the replica's deadline left unscored (absent from scores)
    cached: int = 0  # pairs answered from the replica's score cache
    cost_ratio: float = 0.0  # the replica's live model time over its published cost model's (0: not measured)
    cost: Cost | None = None  # its queue wait, model time and model time per pair now (None: a replica too old to say)


def channel_options(max_message_mb: int = 16, keepalive_time_s: float = 30.0,
                    keepalive_timeout_s: float = 10.0) -> list[tuple[str, int]]:
    limit = max_message_mb * 1024 * 1024
    return [
        # No retry policy: retrying on another replica is the pool's business. gRPC's transparent retries
        # (an RPC that never left this process, say on a connection closed by GOAWAY) stay on.
        # The stages may send up to their max_message_mb; the default 4 MiB receive limit would cut a large answer.
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # A replica that vanished without closing its connections is noticed within a ping.
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Reconnect to a restarted replica quickly rather than after gRPC's default backoff.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


@dataclass(frozen=True)
class WriteReply:
    """One replica's answer to a write."""

    count: int  # upserted, or live documents deleted
    doc_count: int
    superseded: int
    newest: Version | None

    @classmethod
    def of(cls, reply, count: int) -> "WriteReply":
        newest = version_from_proto(reply.newest_version) if reply.HasField("newest_version") else None
        return cls(count, reply.doc_count, reply.superseded, newest)


class _Client:
    STUB = None
    SERVICE = ""  # the proto service's full name, for span names

    def __init__(self, target: str, name: str, credentials: Credentials | ReloadingCredentials = PLAINTEXT,
                 options: list | None = None):
        self.target = target
        self.name = name  # what callers are told, never the address
        # Replaced when rotated credentials arrive: new connections present them, calls in flight finish.
        self._rotating = RotatingChannel(target, credentials, options if options is not None else channel_options())
        self._stub_for = None
        self._stub = None
        self._metadata_of: tuple = ()
        self._metadata: grpc.aio.Metadata | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._rotating.channel

    @property
    def stub(self):
        channel = self.channel
        if channel is not self._stub_for:
            self._stub_for, self._stub = channel, self.STUB(channel)
        return self._stub

    async def close(self) -> None:
        await self._rotating.close()

    async def _call(self, method: str, request, timeout_s: float | None):
        """One RPC with this client's credentials (and the trace context, when traced); its failure as a
        domain error."""
        if not tracing.enabled:
            return await self._send(method, request, timeout_s, self._rotating.metadata)
        if f"{self.SERVICE}/{method}" in tracing.DECLINED_IN_REQUEST:
            # Said in the message, not by a header on the call; set either way, so that a message sent again
            # never keeps an earlier request's answer.
            request.trace_unsampled = tracing.declined()
            if request.trace_unsampled:
                return await self._send(method, request, timeout_s, self._rotating.metadata)
        if not tracing.sampled():  # no span; the callee is still told (flags 00) not to sample it either
            return await self._send(method, request, timeout_s, tracing.outgoing(self._rotating.metadata))
        with tracing.client_span(f"{self.SERVICE}/{method}", self.name, self.target):
            return await self._send(method, request, timeout_s, tracing.outgoing(self._rotating.metadata))

    def _aio_metadata(self, metadata: tuple[tuple[str, str], ...]) -> grpc.aio.Metadata | None:
        """``metadata`` as grpc.aio keeps it, made once while it stays the same (a token's): handed a tuple,
        grpc.aio checks it against typing.Sequence and copies it into one at every call."""
        if metadata != self._metadata_of:
            if not metadata:
                return None
            self._metadata_of, self._metadata = metadata, grpc.aio.Metadata(*metadata)
        return self._metadata

    async def _send(self, method: str, request, timeout_s: float | None, metadata):
        try:
            return await getattr(self.stub, method)(request, timeout=timeout_s, metadata=self._aio_metadata(metadata))
        except grpc.aio.AioRpcError as error:
            raise error_from_rpc(error, self.name, self.target) from None

    async def info(self, timeout_s: float):
        return await self._call("Info", common_pb2.InfoRequest(), timeout_s)

    async def health_status(self, timeout_s: float) -> Health:
        """The replica's health (UNKNOWN: it did not answer). Sent with this client's token: callers without one
        cannot crowd it out."""
        return await channel_health(self.channel, timeout_s, self._rotating.metadata)


class RecallClient(_Client):
    STUB = recall_pb2_grpc.RecallStub
    SERVICE = "twostage.v1.Recall"

    async def search(
        self, query: str, k: int, timeout_s: float, request_id: str, mode: RecallMode | None = None,
        filter_: Filter | None = None, prf: Feedback | None = None, query_vector: np.ndarray | None = None,
        feedback_vector: np.ndarray | None = None, return_vectors: int = 0,
    ) -> RecallReply:
        """Candidates best first, with what the server says about the search. ``prf``: the feedback to run (None:
        the server's settings); ``query_vector``: the query's embedding, given; ``feedback_vector``: only the
        second pass of feedback, with this refined vector."""
        request = recall_pb2.RecallSearchRequest(
            query=query, k=k, request_id=request_id, mode=recall_mode_to_proto(mode), filter=filter_to_proto(filter_),
            return_vectors=return_vectors, query_vector=b"" if query_vector is None else vector_to_bytes(query_vector),
            feedback_vector=b"" if feedback_vector is None else vector_to_bytes(feedback_vector))
        if prf is not None:
            request.prf_depth, request.prf_weight = prf.depth, prf.weight
        reply = await self._call("Search", request, timeout_s)
        candidates = [
            RecallCandidate(c.id, c.title, c.text, c.score, metadata_from_proto(c.metadata) if c.metadata else {},
                            c.dense_score, c.lexical_score, vector_from_bytes(c.vector), c.prf_dense_score)
            for c in reply.candidates
        ]
        calibration = calibration_from_proto(reply.calibration) if reply.HasField("calibration") else None
        return RecallReply(candidates, dict(reply.timings_ms), recall_mode_from_proto(reply.mode), calibration,
                           vector_from_bytes(reply.query_vector), reply.prf_hits, reply.prf_skipped, self.target)

    async def upsert(self, docs: list[Document], timeout_s: float | None, request_id: str = "",
                     version: Version | None = None) -> "WriteReply":
        request = common_pb2.UpsertRequest(documents=[document_to_proto(d) for d in docs], request_id=request_id,
                                           version=None if version is None else version_to_proto(version))
        reply = await self._call("Upsert", request, timeout_s)
        return WriteReply.of(reply, reply.upserted)

    async def delete(self, ids: list[str], timeout_s: float | None, request_id: str = "",
                     version: Version | None = None) -> "WriteReply":
        request = common_pb2.DeleteRequest(ids=ids, request_id=request_id,
                                           version=None if version is None else version_to_proto(version))
        reply = await self._call("Delete", request, timeout_s)
        return WriteReply.of(reply, reply.deleted)

    async def embed(self, texts: list[str], is_query: bool, timeout_s: float | None,
                    model: str = "", refuse_truncation: bool = False) -> tuple[list[list[float]], int]:
        """(one embedding per text, tokens the model read)."""
        request = recall_pb2.EmbedRequest(texts=texts, is_query=is_query, model=model,
                                          refuse_truncation=refuse_truncation)
        reply = await self._call("Embed", request, timeout_s)
        return [list(e.values) for e in reply.embeddings], reply.tokens

    async def get(self, ids: list[str], timeout_s: float | None) -> list[Document]:
        reply = await self._call("Get", common_pb2.GetRequest(ids=ids), timeout_s)
        return [document_from_proto(d) for d in reply.documents]


class RerankClient(_Client):
    STUB = rerank_pb2_grpc.RerankStub
    SERVICE = "twostage.v1.Rerank"

    async def rerank(self, query: str, documents: list[str], timeout_s: float, request_id: str,
                     refuse_truncation: bool = False) -> RerankReply:
        # Partial answers: pairs scored before the deadline are used rather than thrown away with the rest.
        request = rerank_pb2.RerankRequest(query=query, documents=documents, request_id=request_id, allow_partial=True,
                                           refuse_truncation=refuse_truncation)
        reply = await self._call("Rerank", request, timeout_s)
        return RerankReply(
            scores={r.index: r.score for r in reply.results},
            timings_ms=dict(reply.timings_ms),
            tokens=reply.tokens,
            queue_items=reply.queue_items,
            query_truncated=reply.query_truncated,
            unscored=reply.unscored,
            cached=reply.cached,
            cost_ratio=reply.cost_ratio,
            cost=cost_from_proto(reply.cost) if reply.HasField("cost") else None,
        )
