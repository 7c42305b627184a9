"""Settings shared by the services, and the bridge from settings to CLI flags.

Each service has one frozen settings class. A value comes from, highest first:
a CLI flag (``--max-wait-ms 5``), an env var with the service's prefix
(``TWOSTAGE_RERANK_MAX_WAIT_MS=5``), then the default below.
"""

import argparse
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Provider = Literal["auto", "cpu", "cuda", "tensorrt"]


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in a container.")
    port: int = Field(0, description="Port to bind; 0 picks a free one.")
    grace_period_s: float = Field(
        10.0, description="On SIGTERM, how long in-flight RPCs get to finish before they are cancelled."
    )
    metrics_port: int = Field(0, description="Prometheus /metrics port; 0 disables it.")
    max_message_mb: int = Field(16, description="Largest gRPC message accepted or sent.")


class RuntimeSettings(BaseSettings):
    """How a model runs (onnxruntime)."""

    provider: Provider = Field(
        "auto", description="Execution provider: auto picks TensorRT, then CUDA, when installed; else CPU."
    )
    intra_op_threads: int = Field(
        0, description="Threads inside one operator; 0 lets onnxruntime use every physical core."
    )
    inter_op_threads: int = Field(1, description="Operators run in parallel; 1 suits transformer graphs.")
    batch_invariant: bool = Field(
        True,
        description="For dynamically quantised int8 models, quantise activations per row so a result "
        "never depends on its batch-mates (else scores move by up to 0.3 logits). Also closer to fp32; "
        "costs about 10% throughput on CPU. No effect on fp32 models.",
    )


class BatchingSettings(BaseSettings):
    """Dynamic batching knobs. Measure with ``twostage bench`` before changing them."""

    max_batch_size: int = Field(
        32,
        description="Most items in one model call. On CPU the token budget binds first; on a GPU raise "
        "both (64-256 items) until throughput stops growing.",
    )
    max_batch_tokens: int = Field(
        8192,
        description="Most padded tokens (items x longest item) in one call; bounds memory and per-batch "
        "latency. Raise it on a GPU, lower it if one batch takes longer than your budget allows.",
    )
    max_wait_ms: float = Field(
        2.0,
        description="How long the oldest queued item may wait for company before its batch runs. "
        "Adds at most this much latency at low load; 1-5 ms is enough to coalesce concurrent callers.",
    )
    max_queue_items: int = Field(
        4096,
        description="Items waiting beyond this are refused with RESOURCE_EXHAUSTED instead of queued. "
        "Set it to what the model clears within your latency budget (throughput x budget).",
    )
    pipeline_depth: int = Field(
        2,
        description="Batches formed ahead and handed to the executor, so the model never waits for "
        "the next batch to be assembled. 2 is enough; more only adds queueing.",
    )


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """Add one ``--field-name`` flag per settings field; unset flags stay None."""
    group = parser.add_argument_group(f"{settings_cls.__name__} (env prefix {settings_cls.model_config.get('env_prefix', '')})")
    for name, field in settings_cls.model_fields.items():
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            help=f"{field.description or ''} [default: {field.default}]",
        )


def settings_from_args(settings_cls, args: argparse.Namespace, **overrides):
    """Build settings: flags given on the command line override env and defaults."""
    given = {
        name: getattr(args, name)
        for name in settings_cls.model_fields
        if getattr(args, name, None) is not None
    }
    given.update(overrides)
    return settings_cls(**given)
