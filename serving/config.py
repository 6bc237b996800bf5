"""Config sections owned by the serving stage: ``serve`` (engine budgets, HTTP layer, Serve deployment)
and ``generate`` (offline batch inference over Ray Data with the same engine)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data_pipelines.config import S3Config

__all__ = [
    "AutoscalingSection",
    "EngineConfig",
    "GenerateConfig",
    "GenerateSampling",
    "ModelEntry",
    "ServeConfig",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineConfig(_Section):
    """Budgets of the inference engine (one per replica and model)."""

    backend: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="builtin: raylm's engine (CPU or GPU, plain transformers); vllm: vLLM's AsyncLLM "
        "(CUDA GPUs; the vllm package must be installed on the serving nodes).",
    )
    max_num_seqs: int = Field(
        16, ge=1, description="Most sequences decoding together in one batch (running slots)."
    )
    max_batched_tokens: int = Field(
        2048,
        ge=16,
        description="Most tokens (padded prompt tokens of a prefill batch) in one forward pass.",
    )
    max_waiting: int = Field(
        64, ge=0, description="Bounded queue of admitted-but-not-running requests; beyond it: 503."
    )
    max_model_len: int | None = Field(
        None, ge=8, description="Context length; unset: the model's max_position_embeddings."
    )
    default_max_tokens: int = Field(
        256, ge=1, description="max_tokens when a request leaves it unset (capped by the context)."
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="A request still generating after this long ends with an error."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; auto: float32 on CPU, bfloat16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if present.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads; unset: the replica's CPU count."
    )
    warmup: bool = Field(True, description="Run one short generation before reporting healthy.")
    vllm_engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="backend vllm only: extra vllm.AsyncEngineArgs (e.g. gpu_memory_utilization, "
        "tensor_parallel_size), over the ones raylm derives from this section.",
    )


class ModelEntry(_Section):
    name: str = Field(..., min_length=1, description="The `model` field clients send.")
    path: str = Field(..., min_length=1, description="Exported HF model dir (safetensors).")
    adapter: str | None = Field(
        None, description="PEFT LoRA dir over `path`, merged at load (one copy per adapter)."
    )


class AutoscalingSection(_Section):
    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(1, ge=1, description="Replica ceiling under load.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Sustained load before adding.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Sustained idle before removing.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window averaged for decisions.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas report load.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        return self


class ServeConfig(_Section):
    """``raylm serve``: an OpenAI-compatible, autoscaled Ray Serve app over exported HF dirs."""

    models: list[ModelEntry] = Field(
        default_factory=list,
        description="Models served behind one endpoint; the first is the default.",
    )
    app_name: str = Field("raylm", description="Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the app.")
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to expose).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy.")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode",
        description="Where Serve runs its HTTP proxy: EveryNode (each node holding a replica, "
        "Ray's default), HeadOnly (one address on the head, which outlives any worker node), "
        "Disabled (handles only). Cluster-wide: fixed by the first app that starts Serve.",
    )
    direct_ingress: bool = Field(
        False,
        description="Each replica also answers HTTP itself (same app, host and API keys) on a "
        "port Serve allocates from 30000 (RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT on the head), "
        "skipping the proxy hop: ~15 ms less time to first token measured here. For a load "
        "balancer that targets replicas (a Kubernetes Service); Ray 2.60's experimental "
        "RAY_SERVE_ENABLE_DIRECT_INGRESS, set on the replicas only. Needs a proxy_location "
        "other than Disabled.",
    )
    user_code_thread: bool = Field(
        False,
        description="Run the app on a second event loop in its own thread, as Serve does by "
        "default (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD). raylm's app holds its loop only "
        "briefly (generation runs on the engine's thread, model loads in a worker thread; request "
        "parsing and tokenizing stay on the loop), so by default it shares the replica's main "
        "loop and every streamed frame skips a cross-thread hop.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)
    max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Serve's per-replica cap; unset: engine slots + waiting queue + 8, so the "
        "engine answers overload with an OpenAI error before Serve's plain 503.",
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="Serve router queue per deployment (-1: unbounded)."
    )
    max_models_per_replica: int = Field(
        2, ge=1, description="LRU of loaded models per replica when several are served."
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        le=100,  # Serve's own ceiling (MAX_REPLICAS_PER_NODE_MAX_VALUE)
        description="Most replicas on one node; 1 spreads them one per node, so losing a node "
        "loses one replica and its replacement waits for a node with room. Unset: no limit.",
    )
    api_keys_env: str | None = Field(
        None, description="Env var holding comma-separated API keys; unset/empty: no auth."
    )
    api_keys_file: str | None = Field(
        None, description="File with one API key per line (# comments allowed)."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies: 413.")
    stream_interval: int = Field(
        1,
        ge=1,
        le=64,
        description="Streaming: tokens per frame after a choice's first (which, like the last, is "
        "never held back; no timer). Each frame pays Serve's per-hop cost, so 2-8 raises "
        "throughput under high concurrency at the price of burstier streams.",
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Serve health-check period.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="Serve health-check timeout.")
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="In-flight requests get this long to finish on shutdown."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After header on overload answers.")

    @model_validator(mode="after")
    def _unique_names(self) -> ServeConfig:
        names = [m.name for m in self.models]
        if len(names) != len(set(names)):
            raise ValueError(f"models: duplicate names in {names}")
        if self.direct_ingress and self.proxy_location == "Disabled":
            raise ValueError("direct_ingress: replicas serve HTTP only while proxy_location is "
                             "not Disabled")  # fmt: skip
        return self

    def resolved_max_ongoing(self) -> int:
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return self.engine.max_num_seqs + self.engine.max_waiting + 8


class GenerateSampling(_Section):
    """Sampling of rows that do not set their own: a row's column of the same name wins."""

    max_tokens: int = Field(
        256, ge=1, description="Most tokens generated per row (the context also stops a row)."
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=-1, description="0 or -1: off.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI semantics.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI semantics.")
    seed: int | None = Field(
        None,
        description="Seed of every row that sets none (each row draws from its own generator, "
        "so a seeded row's text does not depend on the actor or batch it ran in); unset: random.",
    )
    stop: list[str] = Field(
        default_factory=list, max_length=16, description="Stop strings (not in the output)."
    )
    ignore_eos: bool = Field(False, description="Generate exactly max_tokens (benchmarks).")

    @model_validator(mode="after")
    def _stops(self) -> GenerateSampling:
        if any(not s for s in self.stop):
            raise ValueError("stop: empty strings would stop every row at once")
        return self


class GenerateConfig(_Section):
    """``raylm generate``: prompts (jsonl / parquet) -> an actor pool of the engine -> parquet."""

    inputs: list[str] = Field(
        default_factory=list,
        description="Files, directories, globs or s3:// URIs of jsonl (.jsonl, .json, .jsonl.gz) "
        "or parquet files; rows keep this order in the output (files sorted by path, then line).",
    )
    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto", description="Input format; auto: from the file extension."
    )
    output: str = Field(
        "runs/generate",
        description="Output dir: results/part-*.parquet, manifest.json, the resolved config.",
    )
    model: str = Field("", description="Exported HF model dir (safetensors) that generates.")
    adapter: str | None = Field(None, description="PEFT LoRA dir over `model`, merged at load.")
    mode: Literal["generate", "score"] = Field(
        "generate",
        description="generate: text for each prompt; score: log-probabilities of each row's given "
        "completion after its prompt (one forward pass, nothing generated).",
    )
    prompt_field: str = Field("prompt", description="Row field holding a plain-text prompt.")
    messages_field: str = Field(
        "messages",
        description="Row field holding chat messages, rendered with the model's chat template "
        "(generation stops at its end-of-turn token).",
    )
    completion_field: str = Field(
        "completion", description="score mode: row field holding the completion to score."
    )
    row_sampling: bool = Field(
        True,
        description="Read per-row sampling columns (max_tokens, temperature, top_p, top_k, "
        "presence_penalty, frequency_penalty, seed, stop, ignore_eos) where rows have them.",
    )
    sampling: GenerateSampling = Field(default_factory=GenerateSampling)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    num_actors: int = Field(2, ge=1, description="Engine actors (one model copy each).")
    actor_cpus: float = Field(
        0.5,
        gt=0,
        description="Logical CPUs reserved per engine actor; the pool must leave Ray CPUs free, "
        "or read tasks starve. The engine's torch threads: engine.torch_threads (unset: these "
        "CPUs, at least 1).",
    )
    actor_gpus: float = Field(
        0.0, ge=0, description="GPUs per engine actor (1 with engine.backend vllm)."
    )
    batch_size: int = Field(
        64, ge=1, description="Rows per actor call; the engine batches a call's rows together."
    )
    calls_per_actor: int = Field(
        2,
        ge=1,
        le=16,
        description="Calls an actor runs at once: its engine keeps decoding the next call's rows "
        "while one call's last rows finish.",
    )
    actor_restarts: int = Field(
        0,
        ge=-1,
        description="Restarts of an engine actor that died (-1: unlimited), its call retried; "
        "0: a dead actor fails the job. Ray prints a warning line per actor on the console when "
        "this is not 0 (ray#53727).",
    )
    rows_per_file: int = Field(10_000, ge=1, description="Rows per output parquet file.")
    s3: S3Config = Field(default_factory=S3Config)
