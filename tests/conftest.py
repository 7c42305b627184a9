"""Shared fixtures: the real default models, a small real index, and real
gRPC servers on loopback ports picked by the OS."""

import asyncio
import hashlib
import importlib.metadata
import itertools
import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from gateway.config import GatewaySettings
from recall_server.build import build_from_corpus
from recall_server.config import RecallSettings
from rerank_server.config import RerankSettings
from twostage import execution_plan
from twostage.corpus import DEMO_CORPUS, read_corpus, read_qrels, read_queries
from twostage.model_store import DEFAULT_MODELS, cache_dir, fetch_defaults

# Servers run the plan named here rather than calibrating at their first start; test_execution_plan covers
# every plan and the choice by measurement. Recall runs its sessions side by side: the system tests' bulk writes
# embed on both cores, with the same stock graph (and vectors) as single.
os.environ.setdefault("TWOSTAGE_RERANK_EXECUTION_PLAN", "single")
os.environ.setdefault("TWOSTAGE_RECALL_EXECUTION_PLAN", "sessions")

# Queries whose relevant documents go into the test index, with filler documents.
TEST_QUERIES = 8
FILLER_DOCS = 120
CATALOGUE = Path(__file__).parent / "data" / "catalogue.jsonl"
ROOT = Path(__file__).parent.parent
# Indexes the fixtures build, kept between runs. A kept index is used only when everything that could change it is
# unchanged: the corpus, the build options, the pinned models, the TWOSTAGE_* environment, every source file of
# the packages that build it, the libraries and Python that run them and the processor (int8 kernels differ by
# instruction set). tests/recall_server/test_build.py builds afresh.
INDEX_CACHE = Path(os.environ.get("TWOSTAGE_TEST_INDEX_CACHE", cache_dir().parent / "test-indexes"))
INDEX_CACHE_DAYS = 7  # entries unused this long are removed, and builds a killed run left behind
BUILD_LIBRARIES = ("onnxruntime", "usearch", "tokenizers", "numpy")


def _build_key(corpus: Path, options: dict) -> str:
    digest = hashlib.sha256()
    digest.update(Path(corpus).read_bytes())
    digest.update(json.dumps(options, sort_keys=True).encode())
    digest.update(repr(sorted(DEFAULT_MODELS.items())).encode())
    digest.update(repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("TWOSTAGE_"))).encode())
    digest.update(repr([(name, importlib.metadata.version(name)) for name in BUILD_LIBRARIES]).encode())
    digest.update(f"{sys.version}|{sqlite3.sqlite_version}|{sorted(execution_plan.host_identity().items())}".encode())
    for package in ("twostage", "recall_server"):
        for source in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(source.relative_to(ROOT)).encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:32]


def build_index_cached(corpus: Path, out: Path, **options) -> None:
    """``build_from_corpus(corpus, out, **options)``, or a copy of the same build kept from an earlier run."""
    kept = INDEX_CACHE / _build_key(corpus, options)
    if not kept.is_dir():
        INDEX_CACHE.mkdir(parents=True, exist_ok=True)
        _prune_index_cache()
        staging = Path(tempfile.mkdtemp(dir=INDEX_CACHE, prefix=".building-"))
        try:
            build_from_corpus(corpus, staging / "index", progress=False, **options)
            try:
                (staging / "index").rename(kept)  # atomic: a concurrent run keeps the first finished build
            except OSError:
                if not kept.is_dir():  # not a concurrent run's build: this one's failure
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    os.utime(kept)  # in use: not pruned
    shutil.copytree(kept, out)


def _prune_index_cache() -> None:
    horizon = time.time() - INDEX_CACHE_DAYS * 86400
    for entry in INDEX_CACHE.iterdir():
        if entry.is_dir() and entry.stat().st_mtime < horizon:
            shutil.rmtree(entry, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """gpu tests need a CUDA-capable onnxruntime; perf tests run only when asked for (-m perf)."""
    import onnxruntime

    has_gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    asked_for_perf = "perf" in (config.getoption("-m") or "")
    for item in items:
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDAExecutionProvider in this onnxruntime"))
        if item.get_closest_marker("perf") and not asked_for_perf:
            item.add_marker(pytest.mark.skip(reason="benchmark: run with -m perf"))


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    return fetch_defaults(log=lambda message: None)


@pytest.fixture(scope="session")
def demo_data() -> dict:
    queries = read_queries(DEMO_CORPUS)
    qrels = read_qrels(DEMO_CORPUS)
    chosen = sorted(qrels)[:TEST_QUERIES]
    return {
        "queries": {q: queries[q] for q in chosen},
        "qrels": {q: qrels[q] for q in chosen},
        "docs": {d.id: d for d in read_corpus(DEMO_CORPUS)},
    }


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, demo_data) -> Path:
    """JSONL slice: every relevant document of the test queries plus filler."""
    relevant = {doc_id for judged in demo_data["qrels"].values() for doc_id in judged}
    filler = itertools.islice((d for d in demo_data["docs"] if d not in relevant), FILLER_DOCS)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w") as f:
        for doc_id in [*sorted(relevant), *filler]:
            doc = demo_data["docs"][doc_id]
            f.write(json.dumps({"_id": doc.id, "title": doc.title, "text": doc.text}) + "\n")
    return path


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, models, small_corpus) -> Path:
    """Built once; tests that write copy it first (see ``index_copy``)."""
    out = tmp_path_factory.mktemp("index") / "small"
    build_index_cached(small_corpus, out)
    return out


@pytest.fixture(scope="session")
def catalogue_index(tmp_path_factory, models) -> Path:
    """A product catalogue (50 short texts): a corpus of another kind than SciFact's abstracts. Copy it
    before serving it."""
    out = tmp_path_factory.mktemp("catalogue") / "index"
    build_index_cached(CATALOGUE, out)
    return out


@pytest.fixture(scope="session")
def sharded_index(tmp_path_factory, small_corpus, models) -> Path:
    """The small corpus in two shards (INDEX/shard-0, INDEX/shard-1); copy it before writing."""
    out = tmp_path_factory.mktemp("sharded") / "index"
    build_index_cached(small_corpus, out, shards=2)
    return out


@pytest.fixture
def index_copy(tmp_path, built_index) -> Path:

    target = tmp_path / "index"
    shutil.copytree(built_index, target)
    return target


async def start(server_builder):
    service = server_builder()
    port = await service.start()
    return service, f"127.0.0.1:{port}"


@pytest.fixture(scope="session")
async def rerank_target(models):
    from rerank_server.service import RerankService
    from rerank_server.servicer import build_server

    service, target = await start(lambda: build_server(RerankService(RerankSettings(port=0))))
    yield target
    await service.stop(grace_s=1)


@pytest.fixture(scope="session")
async def recall_server(tmp_path_factory, built_index):
    """A recall server over its own copy of the index (tests may write to it)."""

    from recall_server.service import RecallService
    from recall_server.servicer import build_server

    index_dir = tmp_path_factory.mktemp("served") / "index"
    shutil.copytree(built_index, index_dir)
    service, target = await start(lambda: build_server(RecallService(RecallSettings(port=0, index_dir=index_dir))))
    yield service, target
    await service.stop(grace_s=1)


@pytest.fixture(scope="session")
def recall_target(recall_server) -> str:
    return recall_server[1]


@pytest.fixture(scope="session")
async def gateway_target(recall_target, rerank_target):
    from gateway.servicer import build_server

    settings = GatewaySettings(port=0, recall_targets=recall_target, rerank_targets=rerank_target)
    service, target = await start(lambda: build_server(settings))
    yield target
    await service.stop(grace_s=1)


def _running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="session")
async def channel_to():
    """Open (and later close) an aio channel to a target."""
    channels = []
    loop = asyncio.get_running_loop()

    def open_channel(target: str) -> grpc.aio.Channel:
        # A plain fixture runs outside the tests' loop, and grpc takes the thread's default loop, which a CLI
        # test's asyncio.run() unsets when it ends: the channel must belong to the loop the tests run on.
        if not _running():
            asyncio.set_event_loop(loop)
        channel = grpc.aio.insecure_channel(target)
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        await channel.close()


class SlowModel:
    """Fault injection: a real model whose every batch takes ``delay_s`` longer."""

    def __init__(self, inner, delay_s: float):
        self.inner = inner
        self.delay_s = delay_s

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, batch):
        import time

        time.sleep(self.delay_s)
        return self.inner.score(batch)


@pytest.fixture
def slow_reranker(models):
    """A real cross-encoder slowed by ``delay_s`` per batch, for a rerank server's ``model``."""
    from rerank_server.cross_encoder import CrossEncoder

    def make(settings: RerankSettings, delay_s: float) -> SlowModel:
        return SlowModel(CrossEncoder(models["ms-marco-minilm-l12"], settings, settings.max_length), delay_s)

    return make


class FlakyModel:
    """Fault injection: a real model that raises while ``failing`` is set."""

    def __init__(self, inner):
        self.inner = inner
        self.failing = False

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, batch):
        if self.failing:
            raise RuntimeError("injected model failure")
        return self.inner.score(batch)


@pytest.fixture
def flaky_reranker(models):
    from rerank_server.cross_encoder import CrossEncoder

    def make(settings: RerankSettings) -> FlakyModel:
        return FlakyModel(CrossEncoder(models["ms-marco-minilm-l12"], settings, settings.max_length))

    return make
