"""gRPC edge of the recall service: protos in, dataclasses through, protos out."""

import time

import grpc

from recall_server.docstore import BUCKETS
from recall_server.service import RecallService
from twostage import __version__
from twostage.convert import (
    cost_to_proto,
    document_from_proto,
    document_to_proto,
    filter_from_proto,
    fitted_calibration_to_proto,
    hybrid_fusion_to_proto,
    metadata_to_proto,
    recall_mode_from_proto,
    recall_mode_to_proto,
    vector_from_bytes,
    vector_to_bytes,
    version_from_proto,
    version_to_proto,
)
from twostage.server import GrpcService, deadline_of
from twostage.status import translate_errors
from twostage.v1 import common_pb2, recall_pb2, recall_pb2_grpc


def _total_ms_since(start: float) -> dict[str, float]:
    return {"total_ms": 1000 * (time.perf_counter() - start)}


def _given_version(request):
    """The version a gateway assigned, or None for a client writing directly (the server stamps one)."""
    return version_from_proto(request.version) if request.HasField("version") else None


def _write_fields(reply) -> dict:
    fields = {"doc_count": reply.doc_count, "version": version_to_proto(reply.version),
              "superseded": reply.superseded}
    if reply.newest is not None:
        fields["newest_version"] = version_to_proto(reply.newest)
    return fields


class RecallServicer(recall_pb2_grpc.RecallServicer):
    def __init__(self, service: RecallService):
        self.service = service
        self._calibration_of = None
        self._calibration = None

    def _calibration_proto(self) -> recall_pb2.ScoreCalibration | None:
        """The served calibration as a message, made once per fit: made at every search (from a dataclass, by a
        deep copy) it cost more than the rest of the reply."""
        fitted = self.service.calibration
        if fitted is not self._calibration_of:
            self._calibration_of, self._calibration = fitted, fitted_calibration_to_proto(fitted)
        return self._calibration

    @translate_errors
    async def Search(self, request: recall_pb2.RecallSearchRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        answer = await self.service.answer(
            request.query, request.k, deadline_of(context), recall_mode_from_proto(request.mode),
            filter_from_proto(request.filter),
            prf_depth=request.prf_depth if request.HasField("prf_depth") else None,
            prf_weight=request.prf_weight if request.HasField("prf_weight") else None,
            vector=vector_from_bytes(request.query_vector, "query_vector"),
            feedback_vector=vector_from_bytes(request.feedback_vector, "feedback_vector"),
            return_vectors=request.return_vectors,
        )
        reply = recall_pb2.RecallSearchResponse(
            mode=recall_mode_to_proto(answer.mode), calibration=self._calibration_proto(),
            query_vector=vector_to_bytes(answer.vector) if request.return_vectors else b"",
            prf_hits=answer.prf_hits, prf_skipped=answer.prf_skipped, cost=cost_to_proto(answer.cost))
        # Made in place: a Candidate made apart is copied, text and all, when the reply takes it.
        add = reply.candidates.add
        for c in answer.candidates:
            document = c.document
            add(id=document.id, title=document.title, text=document.text, score=c.score,
                metadata=metadata_to_proto(document.metadata) if document.metadata else None,
                dense_score=c.dense_score, lexical_score=c.lexical_score, prf_dense_score=c.prf_dense_score,
                vector=b"" if c.vector is None else vector_to_bytes(c.vector))
        # total_ms covers the whole handler, so callers can tell transport from work.
        reply.timings_ms.update({**answer.timings, **_total_ms_since(start)})
        return reply

    @translate_errors
    async def Embed(self, request: recall_pb2.EmbedRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        vectors, tokens = await self.service.embed(list(request.texts), request.is_query, request.model,
                                                   deadline_of(context), request.refuse_truncation)
        return recall_pb2.EmbedResponse(
            embeddings=[recall_pb2.Embedding(values=v.tolist()) for v in vectors],
            dims=vectors.shape[1],
            timings_ms=_total_ms_since(start),
            tokens=tokens,
        )

    @translate_errors
    async def Upsert(self, request: common_pb2.UpsertRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        docs = [document_from_proto(d) for d in request.documents]
        reply = await self.service.upsert(docs, deadline_of(context), request.request_id, _given_version(request))
        return common_pb2.UpsertResponse(upserted=reply.count, timings_ms=_total_ms_since(start),
                                         request_id=request.request_id, **_write_fields(reply))

    @translate_errors
    async def Delete(self, request: common_pb2.DeleteRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        reply = await self.service.delete(list(request.ids), request.request_id, _given_version(request))
        return common_pb2.DeleteResponse(deleted=reply.count, timings_ms=_total_ms_since(start),
                                         request_id=request.request_id, **_write_fields(reply))

    @translate_errors
    async def Get(self, request: common_pb2.GetRequest, context: grpc.aio.ServicerContext):
        found = await self.service.get(list(request.ids))
        stored = {d.id for d in found}
        return common_pb2.GetResponse(
            documents=[document_to_proto(d) for d in found], missing=[i for i in request.ids if i not in stored]
        )

    @translate_errors
    async def Changes(self, request: recall_pb2.ChangesRequest, context: grpc.aio.ServicerContext):
        batch, replica_id, more = await self.service.changes(request.snapshot_version, request.after_seq,
                                                             request.limit, list(request.ids), request.after_key)
        return recall_pb2.ChangesResponse(
            changes=[recall_pb2.DocumentChange(
                document=common_pb2.Document(id=w.doc.id) if w.deleted else document_to_proto(w.doc),
                deleted=w.deleted, vector=b"" if w.deleted else w.vector.astype("<f4").tobytes(), seq=w.seq,
                key=w.key, version=version_to_proto(w.version))
                for w in batch],
            replica_id=replica_id,
            snapshot_version=request.snapshot_version,
            more=more,
        )

    @translate_errors
    async def Digest(self, request: recall_pb2.DigestRequest, context: grpc.aio.ServicerContext):
        digests, served, horizon = await self.service.digests(request.snapshot_version, request.below_clock)
        return recall_pb2.DigestResponse(
            replica_id=self.service.replica_id, snapshot_version=served, buckets=BUCKETS, purge_horizon=horizon,
            digests=[recall_pb2.BucketDigest(bucket=b, count=count, hash=total)
                     for b, (count, total) in sorted(digests.items())],
        )

    @translate_errors
    async def Versions(self, request: recall_pb2.VersionsRequest, context: grpc.aio.ServicerContext):
        listed, served = await self.service.versions(request.snapshot_version, list(request.buckets))
        return recall_pb2.VersionsResponse(
            replica_id=self.service.replica_id, snapshot_version=served,
            versions=[recall_pb2.DocumentVersion(id=doc_id, version=version_to_proto(version), deleted=deleted)
                      for doc_id, version, deleted in listed],
        )

    @translate_errors
    async def Info(self, request: common_pb2.InfoRequest, context: grpc.aio.ServicerContext):
        info = self.service.info()
        return recall_pb2.RecallInfo(
            version=__version__,
            model=info["model"],
            dims=info["dims"],
            doc_count=info["doc_count"],
            execution_provider=info["execution_provider"],
            execution_plan=info["execution_plan"],
            embedding_graph=info["embedding_graph"],
            index_embedding_graph=info["index_embedding_graph"],
            limits=[common_pb2.Limit(name=k, value=v) for k, v in info["limits"].items()],
            shard=info["shard"],
            shards=info["shards"],
            read_only=info["read_only"],
            default_mode=recall_mode_to_proto(info["default_mode"]),
            hybrid_fusion=hybrid_fusion_to_proto(info["hybrid_fusion"]),
            hybrid_dense_weight=info["hybrid_dense_weight"],
            lexical=info["lexical"],
            calibration=fitted_calibration_to_proto(info["calibration"]),
            prf_depth=info["prf_depth"],
            prf_weight=info["prf_weight"],
        )


def build_server(service: RecallService) -> GrpcService:
    """The GrpcService for a recall server (not yet started)."""
    return GrpcService(
        "recall",
        service.settings,
        [recall_pb2.DESCRIPTOR.services_by_name["Recall"].full_name],
        lambda server: recall_pb2_grpc.add_RecallServicer_to_server(RecallServicer(service), server),
        service,
    )
