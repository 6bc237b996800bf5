"""Bare PyTorch baselines for ``bench/train_throughput.py``: the same model, batches and AdamW as a
``raylm train`` run, without Ray or DeepSpeed. One process, or DDP (gloo) under
``torchrun --nproc_per_node N bench/train_baseline.py SPEC_JSON``.

Each rank reads its rows through ``training.data.MixedRows`` exactly as a raylm worker of the same
rank and world size does, so both sides see identical micro-batches.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from training.batch import forward_packed, loss_targets, token_loss  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.data import MixedRows, dataset_info  # noqa: E402
from training.model import build_model  # noqa: E402

__all__ = ["run"]


def _optimizer(model: torch.nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with raylm's groups: decay on matrices, none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8)


def _step(model: Any, opt: torch.optim.Optimizer, micro_batches: list[dict], pad_id: int) -> None:
    for k, mb in enumerate(micro_batches):
        ids = torch.from_numpy(mb["input_ids"]).long()
        pos = torch.from_numpy(mb["position_ids"]).long()
        last = k == len(micro_batches) - 1
        # DDP: all-reduce gradients only at the accumulation boundary, as DeepSpeed does.
        sync = (
            contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        )
        with sync:
            logits = forward_packed(model, ids, pos)
            total, count = token_loss(logits, loss_targets(ids, pos, pad_id))
            (total / count.clamp(min=1) / len(micro_batches)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(spec: dict[str, Any]) -> dict[str, float]:
    """Train ``spec["steps"]`` steps; steady tokens/s over the steps after ``spec["skip"]``."""
    t_start = time.perf_counter()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    torch.set_num_threads(spec["threads"])
    if world > 1:
        dist.init_process_group("gloo")
    model = build_model(ModelConfig(**spec["model"]), spec["vocab"], torch.float32, seed=0)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(model, spec)
    data = MixedRows([dataset_info(spec["dataset"])], [1.0], 0, spec["global_rows"],
                     spec["micro_batch"], world, rank)  # fmt: skip
    times = []
    t0 = time.perf_counter()
    for micro_batches in data.iter_steps(0, spec["steps"]):
        _step(model, opt, micro_batches, spec["pad_id"])
        # Step to step, reading the next rows included: raylm's tokens/s covers the same span.
        now = time.perf_counter()
        times.append(now - t0)
        t0 = now
    steady = times[spec["skip"] :]
    tokens = spec["global_rows"] * spec["seq_len"]
    if world > 1:
        dist.destroy_process_group()
    return {
        "tokens_per_s": tokens * len(steady) / sum(steady),
        "startup_s": time.perf_counter() - t_start - sum(times),
        "steps_s": sum(times),
    }


if __name__ == "__main__":
    result = run(json.loads(sys.argv[1]))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)
