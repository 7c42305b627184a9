"""Execution plans: how a model's batches run on this host, each keeping a result independent of its
batch-mates.

The contract every invariant plan keeps, bit for bit: ``plan.run(batch, call)[i]`` equals
``plan.run([batch[i]], call)[0]`` for any batch, whatever its size, order, padding and neighbours. The
pair-score cache, and any caller comparing scores across requests, rely on it. onnxruntime's dynamic int8
quantisation picks one activation scale per batch tensor, so the stock graph keeps the contract only when
an item runs alone; the per-row rewrite (``twostage.quantization``) keeps it in any batch. A test checks
every plan on the real models.

Plans (the ``execution_plan`` setting):

- ``single``: the stock graph, one item per call, every intra-op thread on it.
- ``sessions``: N single-threaded stock sessions side by side (N: the intra-op threads, else the cores this
  process may use), each one item per call. The batcher's batch is spread over them, longest items first;
  it grows N-fold, so each session gets what one call got before and a batch takes as long as one did.
- ``rows``: the per-row rewrite in batches of at most ``batch_cap`` items. On a CPU the cap is measured:
  the cost per token grows once a batch's attention tensors outgrow the cache (batches of 16 pairs of 256
  tokens lose a third), so a token budget alone is the wrong bound. On a GPU, where batches pay, it is
  chosen unmeasured and uncapped. For a float model (no dynamic quantisation) ``rows`` runs the graph as
  shipped, whose results padding may move in the last bits; ``auto`` offers it there only on a GPU.
- ``batched``: the stock graph in whole batches, which does NOT keep the contract (``batch_invariant``
  false).

``auto`` picks by measuring the candidates on a few fixed texts of typical length (a second or two), and
keeps the choice per model and host (``PlanCache``), so a restart reuses it; ``twostage models calibrate``
measures longer and replaces it.
"""

import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from twostage.batching import BatchPolicy, plan_batches
from twostage.config import RuntimeSettings
from twostage.errors import ConfigError
from twostage.quantization import has_dynamic_quantization, make_batch_invariant
from twostage.runtime import Encoded, choose_providers, ort

log = logging.getLogger(__name__)

PLAN_CACHE_ENV = "TWOSTAGE_PLAN_CACHE"
# Bumped when what a plan does, or how it is measured, changes: earlier choices are then measured again.
CALIBRATION_VERSION = 1

# Runs one call of the model: (session, items) -> one row of output per item.
ModelCall = Callable[[ort.InferenceSession, list[Encoded]], np.ndarray]


def _session(model: str | bytes, settings: RuntimeSettings, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = settings.inter_op_threads
    return ort.InferenceSession(model, sess_options=options, providers=choose_providers(settings.provider))


def host_cores(settings: RuntimeSettings) -> int:
    """Sessions side by side: the intra-op threads set, else the cores this process may use."""
    return settings.intra_op_threads or len(os.sched_getaffinity(0))


class ExecutionPlan:
    """Runs batches of encoded items with ``call`` on one or more onnxruntime sessions."""

    name = ""
    invariant = True
    graph = "stock"  # "stock" or "per-row": which scores a plan gives (plans of one graph give the same)

    def __init__(self, sessions: list[ort.InferenceSession]):
        self.sessions = sessions
        # How it was chosen: forced, calibrated, cached, unmeasured (a GPU), not invariant, or fallback (the
        # measurement failed, so the plan that needs none runs).
        self.source = "forced"
        self.rates: dict[str, float] = {}  # items/s of each candidate when it was chosen by measuring

    @property
    def label(self) -> str:
        return self.name

    @property
    def provider(self) -> str:
        return self.sessions[0].get_providers()[0]

    @property
    def parallelism(self) -> int:
        """Items the plan computes at once."""
        return 1

    def run(self, batch: Sequence[Encoded], call: ModelCall) -> np.ndarray:
        raise NotImplementedError

    def policy(self, policy: BatchPolicy) -> BatchPolicy:
        """The batcher's policy for this plan."""
        return policy

    def describe(self) -> str:
        how = {"forced": "set by execution_plan", "calibrated": "measured now", "cached": "measured earlier, cached",
               "unmeasured": "a GPU: the rewrite, batched", "not invariant": "batch_invariant=false",
               "fallback": "the calibration failed; see the log"}[self.source]
        measured = ", ".join(f"{name} {rate:.1f}/s" for name, rate in sorted(self.rates.items(), key=lambda r: -r[1]))
        return f"{self.label} on {self.provider} ({how}{'; ' + measured if measured else ''})"

    @property
    def summary(self) -> str:
        """What Info shows: the label, and why when the plan was not chosen as the settings asked."""
        return f"{self.label} (calibration failed)" if self.source == "fallback" else self.label

    def close(self) -> None:
        """Release what the plan holds beyond its sessions (threads); no batch may be running."""


class SinglePlan(ExecutionPlan):
    name = "single"

    def run(self, batch, call):
        return np.concatenate([call(self.sessions[0], [item]) for item in batch])


class SessionsPlan(ExecutionPlan):
    name = "sessions"

    def __init__(self, sessions):
        super().__init__(sessions)
        # The batcher's thread drives the first session itself; the others get a thread each.
        self._pool = ThreadPoolExecutor(max(1, len(sessions) - 1), thread_name_prefix="plan-session")

    @property
    def label(self) -> str:
        return f"sessions x{len(self.sessions)}"

    @property
    def parallelism(self) -> int:
        return len(self.sessions)

    def run(self, batch, call):
        if len(batch) == 1:
            return call(self.sessions[0], list(batch))
        results: list = [None] * len(batch)
        waiting = deque(sorted(range(len(batch)), key=lambda i: -batch[i].length))  # longest first: a short tail

        def work(session):
            try:
                while waiting:
                    try:
                        i = waiting.popleft()
                    except IndexError:  # another session took the last one
                        return
                    results[i] = call(session, [batch[i]])
            except BaseException:
                waiting.clear()  # the batch has failed: its other items need not run
                raise

        helpers = [self._pool.submit(work, s) for s in self.sessions[1:len(batch)]]
        try:
            work(self.sessions[0])
        finally:  # nothing of this batch runs on beside the next one
            wait(helpers)
        for helper in helpers:
            helper.result()
        return np.concatenate(results)

    def policy(self, policy):
        n = len(self.sessions)
        return replace(policy, max_batch_size=policy.max_batch_size * n, max_batch_tokens=policy.max_batch_tokens * n,
                       bulk_max_batch_tokens=policy.bulk_max_batch_tokens * n)

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


class RowsPlan(ExecutionPlan):
    name = "rows"
    graph = "per-row"

    def __init__(self, sessions, batch_cap: int | None):
        super().__init__(sessions)
        self.batch_cap = batch_cap

    @property
    def label(self) -> str:
        return f"rows <={self.batch_cap}" if self.batch_cap else "rows"

    @property
    def parallelism(self) -> int:
        return self.batch_cap or 1

    def run(self, batch, call):
        cap = self.batch_cap or len(batch)
        out = [None] * len(batch)
        for part in plan_batches([item.length for item in batch], cap, 1 << 62):
            for i, row in zip(part, call(self.sessions[0], [batch[i] for i in part])):
                out[i] = row
        return np.stack(out)

    def policy(self, policy):
        return replace(policy, max_batch_size=min(policy.max_batch_size, self.batch_cap or policy.max_batch_size))


class BatchedPlan(ExecutionPlan):
    name = "batched"
    invariant = False
    graph = "stock, batched"  # the stock graph's results, moved by their batch-mates

    def run(self, batch, call):
        return call(self.sessions[0], list(batch))


PLAN_NAMES = ("single", "sessions", "rows")


@dataclass
class _Graphs:
    """A model file's stock and per-row graphs, each read and rewritten once however many sessions need it."""

    path: Path
    _stock: onnx.ModelProto | None = None
    _rows: bytes | None = None

    def stock(self) -> onnx.ModelProto:
        if self._stock is None:
            self._stock = onnx.load(str(self.path))
        return self._stock

    def quantized(self) -> bool:
        return has_dynamic_quantization(self.stock())

    def rows(self) -> str | bytes:
        if not self.quantized():
            return str(self.path)
        if self._rows is None:
            rewritten = onnx.ModelProto()
            rewritten.CopyFrom(self.stock())
            self._rows = make_batch_invariant(rewritten).SerializeToString()
        return self._rows


def build(name: str, model_path: Path, settings: RuntimeSettings, batch_cap: int | None = None,
          graphs: _Graphs | None = None) -> ExecutionPlan:
    graphs = graphs or _Graphs(Path(model_path))
    if name == "single":
        return SinglePlan([_session(str(model_path), settings, settings.intra_op_threads)])
    if name == "sessions":
        return SessionsPlan([_session(str(model_path), settings, 1) for _ in range(host_cores(settings))])
    if name == "rows":
        return RowsPlan([_session(graphs.rows(), settings, settings.intra_op_threads)], batch_cap)
    if name == "batched":
        return BatchedPlan([_session(str(model_path), settings, settings.intra_op_threads)])
    raise ConfigError(f"unknown execution plan {name!r}; one of auto, {', '.join(PLAN_NAMES)}")


@dataclass(frozen=True)
class Measured:
    """What a calibration found: the best plan and every candidate's rate (items/s)."""

    plan: str
    batch_cap: int | None
    rates: dict[str, float] = field(default_factory=dict)


def measure(plan: ExecutionPlan, items: Sequence[Encoded], call: ModelCall, batch: int) -> float:
    """Items/s of ``plan`` over ``items``, fed to it in length-sorted batches of ``batch`` items."""
    start = time.perf_counter()
    for part in plan_batches([item.length for item in items], batch, 1 << 62):
        plan.run([items[i] for i in part], call)
    return len(items) / (time.perf_counter() - start)


def _feed(plan: ExecutionPlan) -> int:
    """Items per batch a plan is measured with: what it computes at once, twice over for sessions (so that
    lengths even out across them, as in the batcher's batches, which grow N-fold for them)."""
    return 2 * plan.parallelism if isinstance(plan, SessionsPlan) else plan.parallelism


def candidates(model_path: Path, settings: RuntimeSettings, caps: Sequence[int]) -> list[ExecutionPlan]:
    """Every invariant plan worth measuring on this host's CPU: single, sessions (with more than one core) and,
    for a dynamically quantised model, rows at each batch cap (one session shared)."""
    graphs = _Graphs(Path(model_path))
    plans = [build("single", model_path, settings, graphs=graphs)]
    if host_cores(settings) > 1:
        plans.append(build("sessions", model_path, settings, graphs=graphs))
    if graphs.quantized():
        rows = build("rows", model_path, settings, graphs=graphs)
        plans += [RowsPlan(rows.sessions, cap) for cap in caps]
    return plans


def calibrate(model_path: Path, settings: RuntimeSettings, typical: Sequence[Encoded], call: ModelCall,
              caps: Sequence[int] | None = None, most_rounds: int = 3, allowance_s: float = 1.0,
              plans: list[ExecutionPlan] | None = None) -> tuple[Measured, list[ExecutionPlan]]:
    """Measure every candidate on the ``typical`` items (repeated to fill a plan's batch), taking turns for up
    to ``most_rounds`` rounds while they fit in about ``allowance_s`` (one at least); each one's best round
    counts (another tenant only ever slows a round down). Without ``caps``, the rewrite starts at 4 items a
    batch and the cap doubles while the cost per token falls. Returns what was found and the candidates, so
    the caller can keep the winner's sessions."""
    growing = caps is None
    plans = plans or candidates(model_path, settings, caps or (4,))
    rates: dict[str, float] = {}

    def time_one(plan: ExecutionPlan, warm: bool = False) -> float:
        count = max(len(typical), _feed(plan))
        items = [typical[i % len(typical)] for i in range(count)]
        if warm:  # the first run of each shape allocates
            plan.run(items[: _feed(plan)], call)
        rates[plan.label] = max(measure(plan, items, call, _feed(plan)), rates.get(plan.label, 0.0))
        return rates[plan.label]

    started = time.perf_counter()
    for plan in plans:
        time_one(plan, warm=True)
    rows = [p for p in plans if isinstance(p, RowsPlan)]
    while growing and rows and max(plans, key=lambda p: rates[p.label]) is rows[-1] and rows[-1].batch_cap < 64:
        plans.append(RowsPlan(rows[-1].sessions, 2 * rows[-1].batch_cap))
        if time_one(plans[-1], warm=True) <= rates[rows[-1].label]:
            break
        rows.append(plans[-1])
    for _ in range(most_rounds - 1):
        if time.perf_counter() - started > allowance_s:
            break
        for plan in plans:
            time_one(plan)
    best = max(plans, key=lambda p: rates[p.label])
    return Measured(best.name, getattr(best, "batch_cap", None), rates), plans


def host_identity() -> dict:
    """What a measured choice depends on besides the model: the processor, the cores, onnxruntime."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    model_name = fields.get("model name") or platform.processor() or platform.machine()
    flags = fields.get("flags") or fields.get("Features", "")
    return {"cpu": model_name, "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "avx512_vnni": "avx512_vnni" in flags.split(), "cores": len(os.sched_getaffinity(0)),
            "onnxruntime": ort.__version__}


class PlanCache:
    """Calibrations kept per model and host, one JSON file each (``$TWOSTAGE_PLAN_CACHE``, else ``plans``
    beside the model cache)."""

    def __init__(self, root: Path | None = None):
        if root is None:
            from twostage.model_store import cache_dir

            root = Path(os.environ.get(PLAN_CACHE_ENV) or cache_dir().parent / "plans")
        self.root = Path(root)

    @staticmethod
    def key(model_digest: str, settings: RuntimeSettings, typical: str) -> dict:
        return {"model": model_digest, "typical": typical, "provider": settings.provider,
                "intra_op_threads": settings.intra_op_threads, "inter_op_threads": settings.inter_op_threads,
                "version": CALIBRATION_VERSION, **host_identity()}

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.root / f"{digest}.json"

    def get(self, key: dict) -> Measured | None:
        """The kept choice; None when there is none or it is unreadable (then it is measured again)."""
        try:
            saved = json.loads(self.path(key).read_text())
            cap, rates = saved.get("batch_cap"), saved.get("rates", {})
            if (saved.get("key") != key or saved["plan"] not in PLAN_NAMES
                    or not (cap is None or (type(cap) is int and cap > 0))
                    or not all(isinstance(rate, (int, float)) for rate in rates.values())):
                return None
            return Measured(saved["plan"], cap, rates)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def put(self, key: dict, measured: Measured, how: str) -> Path:
        """Written whole or not at all: servers starting together may calibrate at once."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        record = {"key": key, "plan": measured.plan, "batch_cap": measured.batch_cap, "rates": measured.rates,
                  "measured_by": how, "measured_at": time.time()}
        with tempfile.NamedTemporaryFile("w", dir=self.root, suffix=".tmp", delete=False) as f:
            try:
                json.dump(record, f, indent=1)
            except BaseException:
                f.close()
                os.unlink(f.name)
                raise
        os.replace(f.name, target)
        return target


def _typical_label(sample: Sequence[Encoded]) -> str:
    return f"{len(sample)}x{round(float(np.mean([item.length for item in sample])))}"


def recalibrate(model_path: Path, settings: RuntimeSettings, call: ModelCall, typical: Callable[[], list[Encoded]],
                model_digest: str, rounds: int = 5, cache: PlanCache | None = None) -> tuple[Measured, Path]:
    """A longer calibration than a start's (``rounds`` full rounds, the rewrite at caps 2 to 32), kept where
    servers starting with ``auto`` on this model and host read it: ``twostage models calibrate``."""
    cache = cache or PlanCache()
    sample = typical()
    measured, plans = calibrate(model_path, settings, sample, call, caps=(2, 4, 8, 16, 32), most_rounds=rounds,
                                allowance_s=float("inf"))
    for plan in plans:
        plan.close()
    return measured, cache.put(cache.key(model_digest, settings, _typical_label(sample)), measured,
                               "twostage models calibrate")


_calibrating = threading.Lock()  # servers in one process (tests, 'serve all') measure one at a time


def load(model_path: Path, settings: RuntimeSettings, call: ModelCall, typical: Callable[[], list[Encoded]],
         model_digest: str, cache: PlanCache | None = None) -> ExecutionPlan:
    """The plan the settings ask for: ``batched`` without batch invariance, the named plan when one is set,
    else (``auto``) the rewrite on a GPU, and on a CPU the best measured (cached per model and host, measured
    now on ``typical()`` items when not)."""
    wanted = settings.execution_plan
    if not settings.batch_invariant:
        if wanted != "auto":
            raise ConfigError(f"execution_plan={wanted} keeps results independent of their batch-mates, which "
                              "batch_invariant=false gives up; leave execution_plan at auto")
        plan = build("batched", model_path, settings)
        plan.source = "not invariant"
    elif wanted != "auto":
        plan = build(wanted, model_path, settings)
    elif choose_providers(settings.provider)[0] != "CPUExecutionProvider":
        plan = build("rows", model_path, settings)
        plan.source = "unmeasured"
    else:
        cache = cache or PlanCache()
        sample = typical()
        key = cache.key(model_digest, settings, _typical_label(sample))
        with _calibrating:
            measured = cache.get(key)
            if measured is not None:
                plan = build(measured.plan, model_path, settings, measured.batch_cap)
                plan.source = "cached"
            else:
                plan, measured = _calibrate_at_start(model_path, settings, sample, call, cache, key)
        plan.rates = dict(measured.rates)
    log.info("%s: execution plan %s", Path(model_path).parent.name, plan.describe())
    return plan


def _calibrate_at_start(model_path: Path, settings: RuntimeSettings, sample: Sequence[Encoded], call: ModelCall,
                        cache: PlanCache, key: dict) -> tuple[ExecutionPlan, Measured]:
    """Measure the candidates and keep the winner's sessions. A failure (a candidate that does not load or run
    on this host) must not stop the server: it falls back to ``single``, which needs no measurement, says so
    in the log and Info, and keeps nothing, so the next start measures again."""
    tried: list[ExecutionPlan] = []
    try:
        tried = candidates(model_path, settings, (4,))
        measured, tried = calibrate(model_path, settings, sample, call, plans=tried)
    except Exception as error:  # noqa: BLE001 - onnxruntime's errors derive from Exception alone
        for other in tried:
            other.close()
        log.warning("%s: measuring the execution plans failed (%s: %s); running 'single', the stock graph one "
                    "item per call, unmeasured", Path(model_path).parent.name, type(error).__name__, error)
        plan = build("single", model_path, settings)
        plan.source = "fallback"
        return plan, Measured("single", None)
    plan = next(p for p in tried if p.name == measured.plan and getattr(p, "batch_cap", None) == measured.batch_cap)
    for other in tried:
        if other.sessions is not plan.sessions:
            other.close()
    plan.source = "calibrated"
    try:
        cache.put(key, measured, "startup")
    except OSError as error:
        log.warning("could not keep the execution plan's calibration in %s: %s", cache.root, error)
    return plan, measured


def calibrate_models(models: Sequence[str] | None = None, rounds: int = 5) -> Iterator[str]:
    """``twostage models calibrate``: recalibrate each model (default: the rerank and recall servers') with the
    settings its server reads (a reranker TWOSTAGE_RERANK_*, an embedder TWOSTAGE_RECALL_*); yields report lines."""
    from recall_server.config import RecallSettings
    from recall_server.embedder import Embedder
    from rerank_server.config import RerankSettings
    from rerank_server.cross_encoder import CrossEncoder
    from twostage.manifest import ModelManifest
    from twostage.model_store import resolve_model

    rerank, recall = RerankSettings(), RecallSettings()
    yield f"host: {host_identity()}"
    for name in models or [rerank.model, recall.model]:
        model_dir = resolve_model(name)
        reranker = ModelManifest.load(model_dir).task == "rerank"
        settings = rerank if reranker else recall
        if not settings.batch_invariant:
            yield f"{name}: batch_invariant is off, so it runs the stock graph in whole batches; nothing to calibrate"
            continue
        if choose_providers(settings.provider)[0] != "CPUExecutionProvider":
            yield f"{name}: a GPU provider runs the per-row rewrite, batched, unmeasured; nothing to calibrate"
            continue
        unmeasured = settings.model_copy(update={"execution_plan": "single"})
        model = (CrossEncoder(model_dir, unmeasured, settings.max_length) if reranker
                 else Embedder(model_dir, unmeasured, settings.max_length))
        typical = model.typical_pairs if reranker else model.typical_documents
        yield f"{name}: measuring {rounds} rounds ..."
        measured, path = recalibrate(model.model_file, settings, model._call, typical, model.digest, rounds)
        unit = "pairs/s" if reranker else "texts/s"
        for label, rate in sorted(measured.rates.items(), key=lambda item: -item[1]):
            yield f"  {label:16} {rate:8.2f} {unit}"
        yield f"  chosen: {max(measured.rates, key=measured.rates.get)} (kept in {path})"
