"""Settings shared by the services, and the bridge from settings to CLI flags.

Each service has one frozen settings class. A value comes from, highest first:
a CLI flag (``--max-wait-ms 5``), an env var with the service's prefix
(``TWOSTAGE_RERANK_MAX_WAIT_MS=5``), a settings file (``--settings-file``:
the same variables, one ``NAME=VALUE`` a line, as ``twostage eval --tune``
writes them), then the default below.
"""

import argparse
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from twostage.errors import ConfigError

Provider = Literal["auto", "cpu", "cuda", "tensorrt"]


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in a container.")
    port: int = Field(0, ge=0, le=65535, description="Port to bind; 0 picks a free one.")
    reuse_port: bool = Field(
        False,
        description="Let several processes share the port (SO_REUSEPORT). Off: a port already in use is "
        "an error, so a second stack can never silently answer half the requests.",
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight RPCs get to finish before they are cancelled."
    )
    drain_delay_s: float = Field(
        0.0, ge=0, le=300,
        description="On SIGTERM, report NOT_SERVING and keep serving this long before refusing new RPCs, so "
        "load balancers and gateways notice first (5 in Kubernetes; 0 stops at once).",
    )
    max_concurrent_rpcs: int = Field(
        1000, ge=1, le=1_000_000,
        description="RPCs handled at once; more are refused with RESOURCE_EXHAUSTED, not queued."
    )
    keepalive_time_s: float = Field(
        30.0, ge=1, description="Idle connections are pinged this often, so dead peers are noticed."
    )
    keepalive_timeout_s: float = Field(10.0, ge=1, description="A ping unanswered this long closes the connection.")
    max_streams_per_connection: int = Field(
        1024, ge=1,
        description="Calls one connection may have open at once (HTTP/2 max_concurrent_streams); more wait in the "
        "client. Bounds what one client holds; the gateway sends all its calls to a replica over one connection, "
        "so keep this above its concurrency toward one replica.",
    )
    max_connection_idle_s: float = Field(
        300.0, gt=0, description="A connection with no call open for this long is closed (the client reconnects)."
    )
    max_connection_age_s: float = Field(
        1800.0, gt=0,
        description="A connection is asked to go away (GOAWAY) after this long; calls in flight get "
        "grace_period_s to finish, new calls go over a new connection.",
    )
    watchdog_s: float = Field(
        60.0, ge=1,
        description="A model batch running longer than this means the model thread is stuck: the service turns "
        "NOT_SERVING (readiness and liveness) and queued work fails over to other replicas.",
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it.")
    metrics_host: str = Field(
        "127.0.0.1", description="Address the metrics endpoint binds; 0.0.0.0 to let a scraper in another pod reach it."
    )
    max_message_mb: int = Field(16, ge=1, le=2047, description="Largest gRPC message accepted or sent.")
    tls_dir: Path | None = Field(
        None,
        description="Serve TLS from this directory (ca.pem, server.pem, server.key; client.pem and client.key for "
        "calls to other tiers); files are re-read when they change. Unset: plaintext.",
    )
    tls_client_auth: bool = Field(
        False, description="With TLS, accept only clients whose certificate chains to ca.pem (mutual TLS)."
    )
    auth_tokens: Path | None = Field(
        None,
        description="Tokens file ('twostage auth add-token'): every call but health needs a bearer token, and "
        "writes need the admin role. Re-read when it changes. Unset: no auth.",
    )
    auth_tokens_extra: Path | None = Field(
        None,
        description="A second tokens file, read like auth_tokens and beside it ('serve all' puts the gateway's own "
        "token here, so the stages read the caller's file itself and a revocation reaches them).",
    )
    max_open_rpcs: int = Field(
        16, ge=1,
        description="With auth, calls that need no token (health Check, reflection) held at once; more are refused "
        "with RESOURCE_EXHAUSTED. They have these slots of their own, beyond max_concurrent_rpcs.",
    )
    message_timeout_s: float = Field(
        5.0, gt=0,
        description="With auth, a call that needs no token and has not sent its request message this long after "
        "its headers is ended (DEADLINE_EXCEEDED), and so is an open streaming call (reflection) this long after "
        "it began; so is a health Check on health_port, with or without auth. The gateway's HTTP face holds every "
        "request to it: its headers within this long of the connection (or of its first byte), 408 or closed "
        "after; its body within this long of the headers, 408 after.",
    )
    health_port: int = Field(
        0, ge=0, le=65535,
        description="A plaintext port serving only grpc.health.v1, for probes that cannot speak TLS (Kubernetes "
        "gRPC probes); 0: none. It reveals nothing but SERVING or NOT_SERVING.",
    )
    reflection: Literal["auto", "on", "off"] = Field(
        "auto", description="gRPC server reflection; auto serves it without auth and hides it with auth."
    )


class RuntimeSettings(BaseSettings):
    """How a model runs (onnxruntime)."""

    provider: Provider = Field(
        "auto", description="Execution provider: auto picks TensorRT, then CUDA, when installed; else CPU."
    )
    intra_op_threads: int = Field(
        0, ge=0, description="Threads inside one operator; 0 lets onnxruntime use every physical core."
    )
    inter_op_threads: int = Field(1, ge=1, description="Operators run in parallel; 1 suits transformer graphs.")
    batch_invariant: bool = Field(
        True,
        description="Keep every result independent of its batch-mates (dynamically quantised int8 models pick "
        "one activation scale per batch, so scores move by up to 0.3 logits with them): the model runs as "
        "execution_plan says. false runs the stock graph in whole batches.",
    )
    execution_plan: Literal["auto", "single", "sessions", "rows"] = Field(
        "auto",
        description="How batches run, each plan batch-invariant: single (the stock graph, one item per call), "
        "sessions (one single-threaded stock session per core side by side, one item per call each), rows (the "
        "per-row int8 rewrite in batches capped by measured cost per token). auto: rows on a GPU; on a CPU the "
        "fastest, measured at the first start on this model and host and cached ('twostage models calibrate').",
    )


class BatchingSettings(BaseSettings):
    """Dynamic batching knobs. Measure with ``twostage bench`` before changing them."""

    max_batch_size: int = Field(
        32, ge=1,
        description="Most items in one model call. On CPU the token budget binds first; on a GPU raise "
        "both (64-256 items) until throughput stops growing.",
    )
    max_batch_tokens: int = Field(
        8192, ge=1,
        description="Most padded tokens (items x longest item) in one call; bounds memory and per-batch "
        "latency. Raise it on a GPU, lower it if one batch takes longer than your budget allows.",
    )
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000,
        description="How long the oldest queued item may wait for company before its batch runs. "
        "Adds at most this much latency at low load; 1-5 ms is enough to coalesce concurrent callers.",
    )
    max_queue_items: int = Field(
        4096, ge=1,
        description="Items waiting beyond this are refused with RESOURCE_EXHAUSTED instead of queued. "
        "Set it to what the model clears within your latency budget (throughput x budget).",
    )
    bulk_max_batch_tokens: int = Field(
        8192, ge=1,
        description="Most padded tokens in one batch of bulk items (documents being written). Small bulk "
        "batches keep a query that arrives mid-batch from waiting long; recall lowers it.",
    )
    bulk_max_wait_ms: float = Field(
        2000.0, ge=0,
        description="Queries go before bulk items; a bulk item that has waited this long goes next anyway, "
        "so writes progress under any query load.",
    )
    pipeline_depth: int = Field(
        2, ge=1,
        description="Batches formed ahead and handed to the executor, so the model never waits for "
        "the next batch to be assembled. 2 is enough; more only adds queueing.",
    )


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """Add one ``--field-name`` flag per settings field; unset flags stay None."""
    group = parser.add_argument_group(f"{settings_cls.__name__} (env prefix {settings_cls.model_config.get('env_prefix', '')})")
    for name, field in settings_cls.model_fields.items():
        # argparse formats help with %, so a literal one must be doubled.
        text = f"{field.description or ''} [default: {field.default}]".replace("%", "%%")
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=text)


def settings_from_args(settings_cls, args: argparse.Namespace, **overrides):
    """Build settings: flags given on the command line override env, then the settings file, then defaults."""
    given = {
        name: getattr(args, name)
        for name in settings_cls.model_fields
        if getattr(args, name, None) is not None
    }
    given.update(overrides)
    origins = {}
    if settings_file := getattr(args, "settings_file", None):
        environment = {name.upper() for name in os.environ}
        from_file = {field: found for field, found in settings_file_lines(Path(settings_file), settings_cls).items()
                     if env_var(settings_cls, field) not in environment and field not in given}
        given = {**{field: value for field, (value, _) in from_file.items()}, **given}
        origins = {field: f"settings file {settings_file}, line {number}" for field, (_, number) in from_file.items()}
    return load_settings(settings_cls, origins, **given)


SETTINGS_FILE_PREFIX = "TWOSTAGE_"
# The services' env prefixes (their settings classes' env_prefix): a settings file line under none of them is a
# typo no service would read.
SERVICE_PREFIXES = ("TWOSTAGE_RECALL_", "TWOSTAGE_RERANK_", "TWOSTAGE_GATEWAY_")


def read_settings_file(path: Path, settings_cls: type[BaseSettings]) -> dict[str, str]:
    """One service's values from a settings file: environment variable names and values, ``NAME=VALUE`` a line,
    ``#`` comments. One file serves every service: a line under another service's prefix is left to it; a
    name under no service's prefix, a name under this service's prefix that is no setting of it, and a name set
    twice are errors (a typo must not pass unnoticed)."""
    return {field: value for field, (value, _) in settings_file_lines(path, settings_cls).items()}


def settings_file_lines(path: Path, settings_cls: type[BaseSettings]) -> dict[str, tuple[str, int]]:
    """read_settings_file's values with the line each came from."""
    prefix = settings_cls.model_config.get("env_prefix", "").upper()
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConfigError(f"settings file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"settings file {path}: not UTF-8 text") from None
    values, seen = {}, {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        name, value = name.strip().upper(), value.strip()
        if not sep or not name.startswith(SETTINGS_FILE_PREFIX):
            raise ConfigError(f"settings file {path}, line {number}: expected {SETTINGS_FILE_PREFIX}..._NAME=VALUE, "
                              f"got {line!r}")
        if not name.startswith(SERVICE_PREFIXES):
            raise ConfigError(f"settings file {path}, line {number}: {name} is under no service's prefix "
                              f"({', '.join(SERVICE_PREFIXES)})")
        if name in seen:
            raise ConfigError(f"settings file {path}, line {number}: {name} is set again (first on line "
                              f"{seen[name]})")
        seen[name] = number
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if not name.startswith(prefix):
            continue
        field = name.removeprefix(prefix).lower()
        if field not in settings_cls.model_fields:
            raise ConfigError(f"settings file {path}, line {number}: {name} is no setting of {settings_cls.__name__} "
                              "('twostage config' lists them)")
        values[field] = (value, number)
    return values


def env_var(settings_cls: type[BaseSettings], field: str) -> str:
    return f"{settings_cls.model_config.get('env_prefix', '')}{field}".upper()


def load_settings(settings_cls, origins: dict[str, str] | None = None, **given):
    """Build settings; a bad value is a ConfigError naming its flag and environment variable (and ``origins``'
    place for the field, where a value came from a settings file)."""
    try:
        return settings_cls(**given)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = str(item["loc"][0]) if item["loc"] else ""
            source = f"--{field.replace('_', '-')} / {env_var(settings_cls, field)}" if field else settings_cls.__name__
            where = f" ({origins[field]})" if field in (origins or {}) else ""
            problems.append(f"{source} = {item.get('input')!r}{where}: {item['msg']}")
        raise ConfigError("invalid setting: " + "; ".join(problems)) from None
