"""Config sections owned by the training stage: ``model``, ``train``, ``deepspeed``, ``scaling``.

Each section validates only itself; checks that need several sections or the prepared dataset
(batch divisibility, seq_len vs positions, vocab fit, fp16 without CUDA) live in
``training.preflight`` and run on the driver before any worker starts.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "DeepSpeedConfig",
    "DpoConfig",
    "EvalConfig",
    "ModelConfig",
    "MODEL_PRESETS",
    "ScalingConfig",
    "StorageS3Config",
    "TrainConfig",
    "TrainDataset",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Decoder shapes, mapped onto `model.architecture`'s config (training.model). vocab_size comes from
# the tokenizer unless `model.vocab_size` is set. Counts below: Llama with a 32k vocabulary, tied.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    # ~0.4M params at a 4k vocabulary: the tests and the quickstart, on 2 CPU cores.
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=192,
        max_position_embeddings=512,
    ),
    # ~11M: CPU smoke runs.
    "small": dict(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=704,
        max_position_embeddings=1024,
    ),
    "125m": dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=12,
        intermediate_size=2048,
        max_position_embeddings=2048,
    ),
    "350m": dict(
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        intermediate_size=2816,
        max_position_embeddings=2048,
    ),
    # Llama-3.2-1B shape (GQA 32/8).
    "1b": dict(
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        max_position_embeddings=4096,
    ),
}


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


class ModelConfig(_Section):
    """The decoder-only model: a named preset, explicit overrides, or a local HF dir."""

    architecture: Literal["llama", "mistral", "qwen2", "qwen3", "gpt2"] = Field(
        "llama",
        description="transformers family of a from-scratch model; the preset's shape is mapped "
        "onto its config (gpt2: no grouped-query attention). Ignored with init_from.",
    )
    preset: Literal["tiny", "small", "125m", "350m", "1b"] = Field(
        "tiny", description="Named decoder shape; the keys below override single dimensions."
    )
    hidden_size: int | None = Field(None, ge=8, description="Model width (overrides the preset).")
    num_layers: int | None = Field(None, ge=1, description="Decoder layers (overrides the preset).")
    num_heads: int | None = Field(None, ge=1, description="Attention heads (overrides the preset).")
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads for grouped-query attention; unset: the preset's."
    )
    intermediate_size: int | None = Field(
        None, ge=8, description="MLP inner width (overrides the preset)."
    )
    max_position_embeddings: int | None = Field(
        None, ge=8, description="Longest sequence the model supports (overrides the preset)."
    )
    vocab_size: int | None = Field(
        None, ge=8, description="Vocabulary size; unset: the dataset tokenizer's length."
    )
    tie_word_embeddings: bool = Field(True, description="Share input and output embeddings.")
    rope_theta: float = Field(10_000.0, gt=0, description="RoPE base frequency.")
    init_std: float = Field(0.02, gt=0, description="Std of the normal weight initialisation.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = (
        Field(
            "auto",
            description="Attention kernel; auto: the model's transformers default (sdpa where the "
            "family supports it). Packed documents are kept apart by position_ids with each.",
        )
    )
    init_from: str = Field(
        "",
        description="Local HF dir of a causal LM that AutoModelForCausalLM loads (config.json, "
        "safetensors weights, single or sharded) to start from, for continued pretraining or "
        "fine-tuning; its config.json wins over architecture and the shape keys above.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow an init_from dir whose model_type transformers does not know to run "
        "the modelling code shipped in the dir (auto_map). Only for code you trust.",
    )

    def shape(self) -> dict[str, int]:
        """The preset with explicit overrides applied (vocab_size excluded)."""
        out = dict(MODEL_PRESETS[self.preset])
        for key in out:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        s = self.shape()
        if s["hidden_size"] % s["num_heads"]:
            raise ValueError(
                f"hidden_size ({s['hidden_size']}) must be divisible by num_heads ({s['num_heads']})"
            )
        if s["num_heads"] % s["num_kv_heads"]:
            raise ValueError(
                f"num_heads ({s['num_heads']}) must be divisible by num_kv_heads ({s['num_kv_heads']})"
            )
        return self


class TrainDataset(_Section):
    path: str = Field(..., description="Output dir of `raylm data prepare` (has manifest.json).")
    weight: float = Field(1.0, gt=0, description="Relative share of this dataset in each epoch.")


class LoraConfig(_Section):
    """LoRA adapters through ``peft``: only the adapter weights train and go into checkpoints."""

    enabled: bool = Field(False, description="Train LoRA adapters on a frozen `model.init_from`.")
    rank: int = Field(8, ge=1, description="Adapter rank r.")
    alpha: float = Field(16.0, gt=0, description="Adapter updates are scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: all-linear (peft's: every linear and GPT-2 "
        "Conv1D layer except the output head; covers fused projections such as qkv_proj), or "
        "module names (suffixes), e.g. [q_proj, v_proj].",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter. When the tokenizer "
        "outgrows the base vocabulary, the input embedding and an untied output head are added "
        "(found through the model, whatever the family names them).",
    )


class DpoConfig(_Section):
    """``train.task: dpo``: direct preference optimisation on ``data.mode: preference`` pairs."""

    beta: float = Field(
        0.1, gt=0, description="Strength of the pull towards the reference (DPO's beta; IPO's tau)."
    )
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="sigmoid: DPO's -log sigmoid(beta x margin) on summed answer log-probs; ipo: "
        "(margin - 1/(2 beta))^2 on log-probs averaged over the answer tokens (as TRL).",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Share of pairs assumed mislabelled (conservative DPO); sigmoid loss only.",
    )
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of an SFT term: the chosen answers' token-mean NLL over the step, "
        "added to the DPO loss (TRL's rpo_alpha); 0: none.",
    )
    reference: Literal["auto", "precomputed", "adapter_disabled"] = Field(
        "auto",
        description="Where the reference log-probs come from. precomputed: a Ray Data job over "
        "the prepared pairs before training, stored under DATASET/reference/<hash>/ and reused; "
        "adapter_disabled (LoRA): the frozen base with the adapter switched off, in the worker. "
        "auto: adapter_disabled with LoRA and the base as reference, else precomputed.",
    )
    reference_model: str = Field(
        "",
        description="Local HF dir of the reference model; empty: model.init_from (the model the "
        "policy starts from).",
    )

    @model_validator(mode="after")
    def _check(self) -> DpoConfig:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError("label_smoothing applies to the sigmoid loss only")
        return self


class StorageS3Config(_Section):
    """Where an ``s3://`` ``train.storage_path`` is served; ignored for local paths."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (e.g. http://minio:9000) of an s3:// storage_path; "
        "unset: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS.",
    )
    region: str | None = Field(
        None,
        description="Region of the storage bucket; unset: AWS_REGION or AWS_DEFAULT_REGION, else "
        "asked of AWS.",
    )
    staging_dir: str | None = Field(
        None,
        description="Absolute local dir, on each node, where workers write their checkpoint shards "
        "before Ray uploads them in the background (deleted once uploaded); unset: the system "
        "temp dir.",
    )

    @field_validator("staging_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        # Workers run in Ray's per-job working dir: a relative path would land there, per node.
        if value is not None and not os.path.isabs(value):
            raise ValueError("an absolute path")
        return value


class TrainConfig(_Section):
    """``raylm train``: what to train on, for how long, and how often to log/eval/checkpoint."""

    task: Literal["pretrain", "sft", "dpo"] = Field(
        "pretrain",
        description="pretrain: loss on every next token; sft: only where labels != -100 (rows "
        "of a mixed-in pretraining dataset, which has no labels, carry loss on every token); "
        "dpo: preference pairs (data.mode: preference), see train.dpo.",
    )
    datasets: list[TrainDataset] = Field(
        default_factory=list,
        description="Prepared dataset dirs with mixing weights; a plain string is {path, weight: 1}.",
    )
    global_batch_tokens: int = Field(
        16_384,
        ge=1,
        description="Tokens per optimizer step over all ranks (a multiple of seq_len); dpo: "
        "global_batch_tokens / seq_len pairs per step, each side padded to at most seq_len.",
    )
    micro_batch_size: int = Field(
        4, ge=1, description="Rows (dpo: pairs) per rank per forward/backward."
    )
    max_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run; unset: `epochs` full passes."
    )
    epochs: int = Field(1, ge=1, description="Passes over the mixed data when max_steps is unset.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (after warmup).")
    min_lr: float = Field(3e-5, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to lr.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decay on matrices (not norms).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip; 0 disables.")
    log_every: int = Field(10, ge=1, description="Steps between metrics.jsonl rows.")
    eval_every: int = Field(
        0, ge=0, description="Steps between held-out evals; 0: only at the end."
    )
    eval_batches: int = Field(
        8,
        ge=1,
        description="Validation micro-batches per rank per eval (same count on every rank).",
    )
    checkpoint_every: int = Field(
        100, ge=1, description="Steps between checkpoints (and at the end)."
    )
    keep_checkpoints: int = Field(2, ge=2, description="Newest checkpoints kept (at least 2).")
    storage_path: str = Field(
        "runs/train",
        description="Parent of the run dir `storage_path/name`: a path every node reaches (local, "
        "NFS) or s3://bucket/prefix.",
    )
    s3: StorageS3Config = Field(default_factory=StorageS3Config)
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="On a non-finite loss or gradient: stop the run, or skip the update."
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Peak TFLOP/s of one accelerator for MFU; unset: MFU not reported."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute layer activations in backward to save memory."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    progress: bool | None = Field(
        None,
        description="Driver progress bar over the metrics rows (tqdm, on stderr); unset: only "
        "when stderr is a terminal.",
    )
    tensorboard: bool | None = Field(
        None,
        description="Rank 0 writes TensorBoard events to RUN_DIR/tensorboard; unset: when "
        "`tensorboard` (or tensorboardX) is installed.",
    )
    mlflow: bool | None = Field(
        None,
        description="Rank 0 logs the metrics rows to MLflow; unset: when `mlflow` is installed "
        "and a tracking URI is set (mlflow_tracking_uri or MLFLOW_TRACKING_URI).",
    )
    mlflow_tracking_uri: str = Field(
        "", description="MLflow tracking URI; empty: MLFLOW_TRACKING_URI of the driver."
    )
    export_dir: str = Field(
        "",
        description="After the run completes, export its final checkpoint here as `raylm "
        "export` does; empty: no export.",
    )
    export_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Weight dtype of the export at the end of the run."
    )
    export_max_shard_size: str = Field(
        "50GB",
        pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|KiB|MiB|GiB)$",
        description="Largest safetensors file of the export; above it the weights are sharded "
        "with model.safetensors.index.json (as save_pretrained; `raylm export` takes "
        "--set train.export_max_shard_size=...).",
    )

    @field_validator("datasets", mode="before")
    @classmethod
    def _strings_are_paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("storage_path")
    @classmethod
    def _local_or_s3(cls, value: str) -> str:
        # A URI pathlib would turn into a local dir named "gs:" (a run nobody else sees).
        if "://" in value and not value.startswith("s3://"):
            raise ValueError("a local or mounted path, or s3://bucket/prefix")
        if value.startswith("s3://") and not value[5:].split("?")[0].split("/")[0]:
            raise ValueError("no bucket; s3://bucket/prefix")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) is above lr ({self.lr})")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1) (got {list(self.betas)})")
        return self


class DeepSpeedConfig(_Section):
    """ZeRO, offload and precision; turned into a DeepSpeed dict by ``training.ds_config``."""

    zero_stage: int = Field(
        2, ge=0, le=3, description="ZeRO stage 0 (DDP-like) to 3 (params sharded)."
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state on CPU (ZeRO 1-3).")
    offload_params: bool = Field(False, description="Keep parameters on CPU (ZeRO 3 only).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision; fp16 needs CUDA (use bf16 or fp32 on CPU)."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed keys merged last (deep merge) into the dict.",
    )

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got {self.zero_stage})")
        return self


class ScalingConfig(_Section):
    """How many Ray Train workers, on what, and how failures are handled."""

    num_workers: int = Field(1, ge=1, description="Data-parallel ranks (one Ray actor each).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); false: CPU and gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="Logical CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement group strategy for the workers."
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts from the latest checkpoint (-1: unlimited)."
    )
    collective_timeout_s: int = Field(
        1800, ge=1, description="A collective hung this long fails the run (TorchConfig timeout_s)."
    )


class EvalConfig(_Section):
    """``raylm eval``: held-out perplexity, generation-scored tasks and lm-eval tasks for one
    model dir."""

    model: str = Field(
        "",
        description="Local HF model dir to evaluate (safetensors), e.g. a `raylm export` output; "
        "required by `raylm eval`.",
    )
    perplexity_data: list[str] = Field(
        default_factory=list,
        description="`raylm data prepare` output dirs; perplexity over their validation split "
        "(SFT data: on the assistant tokens only). Must use the model's tokenizer.",
    )
    perplexity_rows: int = Field(
        0, ge=0, description="Validation rows read per dataset, in file order; 0: all."
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="jsonl files of {task, messages, reference} (as `raylm synth` writes under "
        "sft/heldout/); each record's task picks the metric: sentiment: accuracy, "
        "qa: exact_match + token_f1, rewrite: chrf.",
    )
    limit_per_task: int = Field(
        0,
        ge=0,
        description="Examples scored per task (and pairs per preference_data file), first ones "
        "in file order; 0: all.",
    )
    preference_data: list[str] = Field(
        default_factory=list,
        description="jsonl files of preference pairs ({prompt, chosen, rejected} or the other "
        "shapes `data prepare` reads, e.g. `raylm synth`'s preference/heldout/style.jsonl): "
        "win_rate is the share of pairs whose chosen answer gets the higher log-prob; "
        "greedy_chosen / greedy_rejected how often the greedy answer is that answer.",
    )
    max_new_tokens: int = Field(
        32, ge=1, description="Greedy decoding stops here unless eos / end-of-turn comes first."
    )
    batch_size: int = Field(
        8, ge=1, description="Rows per perplexity forward pass; sequences decoding together."
    )
    samples: int = Field(3, ge=0, description="Sample predictions per task kept in eval.json.")
    output: str = Field(
        "", description="Directory for eval.json and the resolved config; empty: runs/eval/<name>."
    )
    distributed: bool = Field(
        False,
        description="Spread the work over the Ray cluster: perplexity through a Ray Data actor "
        "pool over the validation rows, generation-scored tasks through `raylm generate`'s engine "
        "actors (eval.actors of each). false: one process.",
    )
    actors: int = Field(2, ge=1, description="Model actors of each distributed eval job.")
    actor_cpus: float = Field(
        0.5,
        gt=0,
        description="Logical CPUs per distributed eval actor; keep actors x actor_cpus below the "
        "CPUs Ray has, or read tasks starve.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if present.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto: float32 on CPU, bfloat16 on CUDA."
    )
    harness_tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks or groups (names or globs) run on eval.model "
        "in-process (lm-eval's hf model), or on eval.harness_endpoint; their metrics join "
        "eval.json. Needs `pip install raylm[eval]`.",
    )
    harness_include_path: list[str] = Field(
        default_factory=list,
        description="Dirs of lm-eval task YAMLs (local data, e.g. dataset_path: json with "
        "data_files); tasks found there skip indexing lm-eval's built-in ones.",
    )
    harness_limit: int = Field(
        0, ge=0, description="Examples per lm-eval task, first ones; 0: all (lm-eval's --limit)."
    )
    harness_endpoint: str = Field(
        "",
        description="Base URL of a running OpenAI-compatible endpoint (e.g. `raylm serve`'s "
        "http://127.0.0.1:8000/v1): lm-eval's local-completions scores through its "
        "/v1/completions, with eval.model's tokenizer; API key from OPENAI_API_KEY. Empty: "
        "in-process.",
    )
    harness_endpoint_model: str = Field(
        "", description="The `model` sent to eval.harness_endpoint; empty: the first it lists."
    )
