"""The one place a typed config becomes a DeepSpeed config dict.

Batch sizes are derived, never configured per rank: ``train.global_batch_tokens`` fixes the rows per
optimizer step, so a run on 2 or 8 workers takes the same optimisation steps (only gradient
accumulation changes). Pure functions; no torch, ray or deepspeed import.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from training.config import DeepSpeedConfig, TrainConfig
from training.errors import TrainConfigError

__all__ = ["BatchPlan", "batch_plan", "build_ds_config", "deep_merge"]


@dataclass(frozen=True)
class BatchPlan:
    """Rows per optimizer step, split as world_size x grad_accum x micro_batch."""

    global_rows: int
    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def rows_per_rank(self) -> int:
        return self.micro_batch * self.grad_accum


def batch_plan(
    global_batch_tokens: int, seq_len: int, micro_batch_size: int, world_size: int
) -> BatchPlan:
    """Derive gradient accumulation; errors name the keys to change."""
    if global_batch_tokens % seq_len:
        raise TrainConfigError(
            f"train.global_batch_tokens ({global_batch_tokens}) must be a multiple of the dataset "
            f"seq_len ({seq_len}); e.g. {max(1, global_batch_tokens // seq_len) * seq_len}"
        )
    rows = global_batch_tokens // seq_len
    per_step = micro_batch_size * world_size
    if rows % per_step:
        raise TrainConfigError(
            f"train.global_batch_tokens / seq_len = {rows} rows per step is not divisible by "
            f"train.micro_batch_size ({micro_batch_size}) x scaling.num_workers ({world_size}) "
            f"= {per_step}; change one of the three"
        )
    return BatchPlan(rows, micro_batch_size, rows // per_step, world_size)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, recursing into dicts present in both. Returns a new dict."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _zero_section(ds: DeepSpeedConfig, use_gpu: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.zero_stage == 3:
        # Export gathers full 16-bit weights from the shards on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def _optimizer_section(train: TrainConfig, ds: DeepSpeedConfig) -> dict[str, Any]:
    params: dict[str, Any] = {
        "lr": train.lr,
        "betas": list(train.betas),
        "eps": train.eps,
        "weight_decay": train.weight_decay,
        "adam_w_mode": True,
    }
    if not ds.offload_optimizer:
        # torch.optim.AdamW: DeepSpeed's FusedAdam needs CUDA; with offload DeepSpeed uses its
        # CPU Adam (JIT-built op) instead.
        params["torch_adam"] = True
    return {"type": "AdamW", "params": params}


def _scheduler_section(train: TrainConfig, total_steps: int) -> dict[str, Any]:
    # Linear warmup 0 -> lr over warmup_steps, then cosine to min_lr at total_steps. The loop
    # steps the scheduler once before training, so step k (1-based) runs at ratio (k-1)/warmup,
    # as in HF's linear warmup. DeepSpeed needs warmup_num_steps >= 1 (uses max(2, n)); with
    # warmup_steps 0 a warmup_min_ratio of 1 makes that "warmup" run at the full lr.
    return {
        "type": "WarmupCosineLR",
        "params": {
            "total_num_steps": max(1, total_steps),
            "warmup_min_ratio": 0.0 if train.warmup_steps else 1.0,
            "warmup_num_steps": max(1, train.warmup_steps),
            "warmup_type": "linear",
            "cos_min_ratio": train.min_lr / train.lr,
        },
    }


def _precision_section(ds: DeepSpeedConfig, cuda_available: bool) -> dict[str, Any]:
    if ds.precision == "fp16":
        if not cuda_available:
            raise TrainConfigError(
                "deepspeed.precision: fp16 needs CUDA GPUs (scaling.use_gpu: true on a GPU "
                "cluster); on CPU use bf16 or fp32"
            )
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    if ds.precision == "bf16":
        # check_grad_overflow: ZeRO skips an update whose gradients are non-finite.
        return {"bf16": {"enabled": True, "check_grad_overflow": True}}
    return {}


def build_ds_config(
    train: TrainConfig,
    ds: DeepSpeedConfig,
    *,
    seq_len: int,
    world_size: int,
    total_steps: int,
    use_gpu: bool = False,
    cuda_available: bool = False,
) -> dict[str, Any]:
    """The full DeepSpeed dict for one run; ``deepspeed.extra`` is deep-merged last."""
    plan = batch_plan(train.global_batch_tokens, seq_len, train.micro_batch_size, world_size)
    conf: dict[str, Any] = {
        "train_batch_size": plan.global_rows,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": _zero_section(ds, use_gpu),
        "optimizer": _optimizer_section(train, ds),
        "scheduler": _scheduler_section(train, total_steps),
        # Our loop logs; DeepSpeed's own per-step prints would only add noise.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Offload with our (possibly torch) optimizer is allowed; DeepSpeed would refuse otherwise.
        "zero_allow_untested_optimizer": True,
    }
    conf.update(_precision_section(ds, cuda_available))
    return deep_merge(conf, ds.extra)
