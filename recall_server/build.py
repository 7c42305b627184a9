"""``twostage index build``: embed a corpus and write a DocumentIndex."""

import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recall_server.embedder import Embedder
from recall_server.index import DocumentIndex, IndexManifest
from recall_server.snapshots import (
    Snapshot,
    building_dir,
    check_version,
    default_version,
    publish,
    read_snapshot,
    shard_root,
)
from twostage.batching import BatchPolicy, plan_batches
from twostage.corpus import Document, corpus_file, corpus_lines, document_text
from twostage.documents import CorpusScan, DocumentLimits, scan_corpus, valid_documents
from twostage.errors import InvalidArgument, TwostageError
from twostage.model_store import DEFAULT_EMBED_MODEL, resolve_model
from twostage.sharding import part_of, shard_of
from twostage.versions import BASE

log = logging.getLogger(__name__)
# Measured on 2 CPU cores (twostage bench embed): 8 documents of 512 tokens per call is fastest.
DEFAULT_BUILD_POLICY = BatchPolicy(max_batch_size=32, max_batch_tokens=4096)


@dataclass(frozen=True)
class BuildReport:
    documents: int
    skipped_lines: int
    dropped_fields: dict[str, int]
    schema: dict[str, str] = field(default_factory=dict)  # metadata key -> type, stored with the index


def embed_documents(embedder: Embedder, docs: list[Document], policy: BatchPolicy, bar: tqdm | None = None) -> np.ndarray:
    """Embed in length-sorted batches within the policy's size and token limits (as the embedder's execution
    plan adjusts them: sessions side by side take a batch each, the per-row rewrite a measured cap).

    The bar counts documents, advanced by each batch's share of the padded tokens (the model's work) rather
    than by its documents: batches go short documents first, so counting documents would show a rate that
    only falls and an ETA that is too early until the end."""
    encoded = embedder.encode([document_text(d) for d in docs], is_query=False)
    vectors = np.empty((len(docs), embedder.dims), dtype=np.float32)
    policy = embedder.plan.policy(policy)
    plans = plan_batches([e.length for e in encoded], policy.max_batch_size, policy.max_batch_tokens)
    work = [len(plan) * max(encoded[i].length for i in plan) for plan in plans]
    total, done, shown = sum(work), 0, 0
    for plan, tokens in zip(plans, work):
        vectors[plan] = embedder.embed([encoded[i] for i in plan])
        done += tokens
        if bar is not None:
            due = round(len(docs) * done / total)
            bar.update(due - shown)
            shown = due
    return vectors


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    iterator = iter(docs)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def shard_dirs(index_dir: Path, shards: int) -> list[Path]:
    return [Path(index_dir) / f"shard-{i}" for i in range(shards)]


def check_corpus(corpus: Path, limits: DocumentLimits, skip_invalid: bool,
                 schema: dict[str, str] | None = None) -> CorpusScan:
    """Validate the whole corpus as Upsert would before embedding anything (minutes to hours); ``schema``
    declares metadata types (the rest are inferred from the first line with each key)."""
    if not corpus_file(corpus).is_file():
        raise FileNotFoundError(f"no corpus at {corpus_file(corpus)}")
    try:
        scan = scan_corpus(corpus_lines(corpus), limits, schema)
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"{corpus_file(corpus)} is not UTF-8 text: {error}") from None
    where = corpus_file(corpus)
    if scan.invalid and not skip_invalid:
        raise InvalidArgument(
            f"{where}: {len(scan.invalid)} invalid lines, nothing indexed: {scan.problems()}. "
            "Fix them, or pass --skip-invalid to index the rest"
        )
    if scan.invalid:
        log.warning("%s: skipping %d invalid lines: %s", where, len(scan.invalid), scan.problems())
    for warning in scan.dropped_warnings():
        log.warning("%s: %s", where, warning)
    if scan.valid == 0:
        raise InvalidArgument(f"{where}: no documents to index")
    return scan


def build_index(
    corpus: Path,
    out: Path,
    embedder: Embedder,
    policy: BatchPolicy,
    limits: DocumentLimits,
    limit: int | None = None,
    shards: int = 1,
    skip_invalid: bool = False,
    chunk_docs: int = 4096,
    progress: bool = True,
    scan: CorpusScan | None = None,
    shard_index: int | None = None,
    part: tuple[int, int] | None = None,
) -> BuildReport:
    """Embed every valid document of ``corpus`` (BEIR dir or JSONL) into a new index at ``out``;
    with ``shards`` > 1, into ``out/shard-0`` .. ``out/shard-{N-1}``, one recall server each, or, with
    ``shard_index``, only that shard into ``out`` (one build job per shard), and with ``part`` = (j, parts)
    only part j of that shard (several jobs per shard, merged by ``merge_parts``).

    The corpus is validated first, like Upsert (``skip_invalid`` indexes the rest). Each index is
    written beside its target and moved into place when complete, so a failed build leaves nothing
    behind, least of all something that looks like an index.
    """
    if Path(out).exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    if shard_index is not None and not 0 <= shard_index < shards:
        raise InvalidArgument(f"--shard-index {shard_index} is not a shard of {shards} (0 to {shards - 1})")
    scan = scan or check_corpus(corpus, limits, skip_invalid)
    total = min(scan.valid, limit or 1 << 62)
    if shard_index is not None:
        plan = [(shard_index, Path(out))]
        total = None  # unknown until the ids are hashed
    else:
        plan = list(enumerate([Path(out)] if shards == 1 else shard_dirs(out, shards)))
    targets = [target for _, target in plan]
    count = 0
    try:
        with tqdm(total=total, unit="doc", desc="embedding", disable=not progress) as bar:
            for shard, target in plan:
                docs: Iterable[Document] = itertools.islice(valid_documents(corpus_lines(corpus), scan), limit)
                if shards > 1:
                    docs = (d for d in docs if shard_of(d.id, shards) == shard)
                if part is not None and part[1] > 1:
                    docs = (d for d in docs if part_of(d.id, shards, part[1]) == part[0])
                count += _build_one(docs, target, embedder, policy, chunk_docs, bar, shard, shards, scan.schema)
    except BaseException:
        for target in targets:
            shutil.rmtree(target.with_name(target.name + ".partial"), ignore_errors=True)
        if shards > 1 and shard_index is None:
            shutil.rmtree(out, ignore_errors=True)
        raise
    log.info("indexed %d documents into %s", count, out)
    return BuildReport(count, len(scan.invalid), dict(scan.dropped_fields), dict(scan.schema))


def _build_one(docs: Iterable[Document], out: Path, embedder, policy, chunk_docs: int, bar: tqdm,
               shard: int, shards: int, schema: dict[str, str]) -> int:
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    index = DocumentIndex.create(partial, embedder.name, embedder.dims, shard=shard, shards=shards,
                                 embedding_graph=embedder.graph, save_every_writes=1 << 62)
    try:
        index.store.declare_schema(schema)  # the whole corpus's, so every shard holds the same types
        for chunk in _chunks(docs, chunk_docs):
            index.upsert(chunk, embed_documents(embedder, chunk, policy, bar), BASE)  # below every live write
        count = index.store.count()
    finally:
        index.close()
    partial.rename(out)
    return count


def build_from_corpus(corpus: Path, out: Path, model: str = DEFAULT_EMBED_MODEL, limit: int | None = None,
                      max_length: int | None = None, max_batch_size: int | None = None,
                      max_batch_tokens: int | None = None, shards: int = 1, skip_invalid: bool = False,
                      progress: bool = True, shard_index: int | None = None,
                      part: tuple[int, int] | None = None, schema: dict[str, str] | None = None,
                      embedder: Embedder | None = None) -> BuildReport:
    """Check the corpus, load the embedding model (unless ``embedder`` is given, loaded already), build an index
    with the recall server's document limits (``schema`` declares metadata types; the rest are inferred)."""
    from recall_server.config import RecallSettings

    if Path(out).exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another --out")
    # The recall server's settings (TWOSTAGE_RECALL_*): its document limits, provider and threads.
    settings = RecallSettings()
    limits = settings.document_limits()
    scan = check_corpus(corpus, limits, skip_invalid, schema)  # before the model loads: a bad corpus fails at once
    embedder = embedder or Embedder(resolve_model(model), settings, max_length)
    policy = replace(
        DEFAULT_BUILD_POLICY,
        max_batch_size=max_batch_size or DEFAULT_BUILD_POLICY.max_batch_size,
        max_batch_tokens=max_batch_tokens or DEFAULT_BUILD_POLICY.max_batch_tokens,
    )
    return build_index(corpus, out, embedder, policy, limits, limit=limit, shards=shards,
                       skip_invalid=skip_invalid, progress=progress, scan=scan, shard_index=shard_index, part=part)


def build_snapshot(corpus: Path, snapshot_dir: Path, shards: int, shard_index: int, version: str | None = None,
                   parts: int = 1, part_index: int = 0, **build_options) -> tuple[BuildReport, Path | None]:
    """Build one shard and publish it as a snapshot (``ROOT/shard-I/VERSION``) for recall servers to load.

    With ``parts`` > 1 this builds part ``part_index`` of the shard (``ROOT/shard-I/.parts-VERSION/part-J``);
    whichever part finds every part complete merges them (stored vectors, no re-embedding) and publishes.
    Returns the published snapshot's path, or None while other parts are still building."""
    version = check_version(version or default_version())
    if not 0 <= part_index < parts:
        raise InvalidArgument(f"part {part_index} is not a part of {parts} (0 to {parts - 1})")
    if parts == 1:
        building = _fresh_building_dir(snapshot_dir, shard_index, version)
        report = build_from_corpus(corpus, building, shards=shards, shard_index=shard_index, **build_options)
        return report, _publish(building, snapshot_dir, shard_index, shards, version, report.documents)
    parts_dir = shard_root(snapshot_dir, shard_index) / f".parts-{version}"
    part_dir = parts_dir / f"part-{part_index}"
    if part_dir.exists():  # a retried job: this part is already complete
        log.info("%s is already built", part_dir)
        report = BuildReport(0, 0, {})
    else:
        parts_dir.mkdir(parents=True, exist_ok=True)
        report = build_from_corpus(corpus, part_dir, shards=shards, shard_index=shard_index,
                                   part=(part_index, parts), **build_options)
    built = [parts_dir / f"part-{j}" for j in range(parts)]
    if missing := [p.name for p in built if not p.exists()]:
        log.info("part %d of shard %d built; waiting for %s (the last part to finish merges)", part_index,
                 shard_index, ", ".join(missing))
        return report, None
    published = merge_parts(built, snapshot_dir, shard_index, shards, version)
    return replace(report, documents=read_snapshot(published).documents), published


def _fresh_building_dir(snapshot_dir: Path, shard_index: int, version: str, suffix: str = "") -> Path:
    building = building_dir(snapshot_dir, shard_index, version)
    building = building.with_name(building.name + suffix)
    building.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(building, ignore_errors=True)  # a build of this version that died
    return building


def _publish(building: Path, snapshot_dir: Path, shard_index: int, shards: int, version: str, documents: int) -> Path:
    manifest = IndexManifest.read(building)
    return publish(building, snapshot_dir, Snapshot(version, shard_index, shards, manifest.model, documents, time.time()))


def merge_parts(parts: list[Path], snapshot_dir: Path, shard_index: int, shards: int, version: str) -> Path:
    """Merge a shard's parts into one index and publish it. Parts finishing together may both merge: the
    first to publish wins and the other discards its copy, so no lock is needed on a shared volume."""
    target = shard_root(snapshot_dir, shard_index) / version
    if target.exists():
        log.info("snapshot %s was published by another part", target)
        return target
    building = _fresh_building_dir(snapshot_dir, shard_index, version, suffix=f"-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        first = IndexManifest.read(parts[0])
        graphs = sorted({IndexManifest.read(part).embedding_graph for part in parts})
        if len(graphs) > 1:  # parts embedded on hosts that chose different execution plans
            log.warning("the parts of shard %d were embedded by different graphs of %s (%s): their vectors differ "
                        "slightly; build every part with one execution_plan", shard_index, first.model, ", ".join(graphs))
        merged = DocumentIndex.create(building, first.model, first.dims, shard=shard_index, shards=shards,
                                      embedding_graph=graphs[0] if len(graphs) == 1 else "mixed: " + ", ".join(graphs),
                                      save_every_writes=1 << 62)
        try:
            for part in parts:
                manifest = IndexManifest.read(part)
                if (manifest.model, manifest.dims) != (first.model, first.dims):
                    raise InvalidArgument(f"{part} was built with {manifest.model}, {parts[0]} with {first.model}")
                source = DocumentIndex.open(part, manifest.model, manifest.dims, read_only=True)
                try:
                    merged.copy_writes(source)
                finally:
                    source.close()
            documents = merged.store.count()
        finally:
            merged.close()
        published = _publish(building, snapshot_dir, shard_index, shards, version, documents)
    except (OSError, TwostageError):
        shutil.rmtree(building, ignore_errors=True)
        if target.exists():  # another part merged and published first (and removed the parts)
            log.info("snapshot %s was published by another part", target)
            return target
        raise
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
    with contextlib.suppress(OSError):
        parts[0].parent.rmdir()  # the .parts-VERSION directory, once empty
    log.info("merged %d parts into %s (%d documents)", len(parts), published, documents)
    return published


@contextlib.contextmanager
def local_corpus(source: str) -> Iterator[Path]:
    """A corpus path for a path or URL: http(s) URLs (a presigned object-store URL, for one) are streamed to
    a temporary file; s3://, gs:// and other fsspec URLs need fsspec and its filesystem package."""
    scheme = source.split("://", 1)[0] if "://" in source else ""
    if not scheme:
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="twostage-corpus-") as tmp:
        target = Path(tmp) / "corpus.jsonl"
        if scheme in ("http", "https"):
            with urllib.request.urlopen(source, timeout=60) as response, open(target, "wb") as out:
                shutil.copyfileobj(response, out, 1 << 20)
        else:
            try:
                import fsspec
            except ImportError:
                raise InvalidArgument(f"--corpus {source}: {scheme}:// URLs need fsspec (pip install fsspec and "
                                      "its filesystem, such as s3fs or gcsfs), or use a presigned https:// URL") from None
            with fsspec.open(source, "rb") as remote, open(target, "wb") as out:
                shutil.copyfileobj(remote, out, 1 << 20)
        log.info("fetched %s (%d bytes)", source, target.stat().st_size)
        yield target


def cached_index(dataset: Path, index_dir: Path | None = None, skip_invalid: bool = False,
                 root: Path | None = None, limit: int | None = None) -> Path:
    """An index of a BEIR data set, built once and kept (in the cache unless ``index_dir`` is given;
    evaluation and benchmarks share it) with the recall server's model (TWOSTAGE_RECALL_*); ``skip_invalid``
    builds it around invalid documents, reported. The cache (``root``, else ``eval-indexes`` beside the model
    cache) keeps one per data set, model and embedding graph (which the execution plan decides), so a server
    is never handed documents another graph embedded. ``limit``: only the first so many documents."""
    import hashlib

    from recall_server.config import RecallSettings
    from twostage.model_store import cache_dir

    settings = RecallSettings()
    embedder = Embedder(resolve_model(settings.model), settings)
    try:
        wanted = (embedder.name, embedder.graph)
        if index_dir is None:
            parts = [str(dataset.resolve()), *wanted, *([f"limit={limit}"] if limit else [])]
            key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
            index_dir = Path(root or cache_dir().parent / "eval-indexes") / f"{dataset.name}-{key}"
        if (index_dir / "index.json").exists():
            manifest = IndexManifest.read(index_dir)
            if (manifest.model, manifest.embedding_graph) != wanted:  # a directory given: the caller's to remove
                log.warning("%s was embedded by %s (%s graph), not by %s (%s graph) as a server here would embed "
                            "queries: remove it to rebuild", index_dir, manifest.model,
                            manifest.embedding_graph or "an unrecorded", *wanted)
            return index_dir
        print(f"building an index of {dataset} into {index_dir}", flush=True)
        build_from_corpus(dataset, index_dir, model=settings.model, skip_invalid=skip_invalid, embedder=embedder,
                          limit=limit)
    finally:
        embedder.close()
    return index_dir
