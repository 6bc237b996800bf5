"""train.nonfinite under ZeRO-1/2 (one process, gloo): one poisoned step is skipped and the run goes
on (skip), or the run stops naming the step and the rank (stop).

The poison is a forward hook that makes the model's logits non-finite during one chosen training
step only, so the steps around it stay normal and show that the bad update was not applied.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.unit.test_train_loop import _job
from training.checkpoint import verify_checkpoint
from training.errors import NonFiniteError
from training.loop import WorkerIO, run_worker
from training.synthetic import write_synthetic_dataset

POISONED = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("nonfinite") / "ds", train_rows=32,
                                   validation_rows=8, seq_len=32)  # fmt: skip


def _run_poisoned(job, report=lambda *a: None):
    done = {"step": 0}

    def poison(module, args, output):
        model = type(module).__name__ == "LlamaForCausalLM" and module.training
        if model and done["step"] + 1 == POISONED:  # the forward passes of step POISONED
            output.logits = output.logits * float("nan")
        return output

    def after_step(step: int, rank: int) -> None:
        done["step"] = step

    handle = torch.nn.modules.module.register_module_forward_hook(poison)
    try:
        return run_worker(job, WorkerIO(0, 1, report, after_step=after_step))
    finally:
        handle.remove()


def _with_zero(job, stage: int):
    job.deepspeed = job.deepspeed.model_copy(update={"zero_stage": stage})
    return job


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [1, 2])
def test_skip_drops_the_poisoned_update_and_the_run_goes_on(stage, dataset, tmp_path) -> None:
    saved = []

    def report(metrics, checkpoint_dir, step, dir_name=None):
        if checkpoint_dir is not None:
            saved.append(verify_checkpoint(checkpoint_dir))

    job = _with_zero(_job(dataset, tmp_path, max_steps=4, lr=3e-3, nonfinite="skip"), stage)
    state = _run_poisoned(job, report)
    assert state.step == 4 and state.skipped_steps == 1
    assert saved[-1].step == 4 and saved[-1].skipped_steps == 1  # in the checkpoint too
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert not math.isfinite(losses[POISONED - 1])
    assert all(math.isfinite(v) for i, v in enumerate(losses) if i != POISONED - 1)
    assert losses[-1] < losses[0]  # the weights stayed finite and kept learning


@pytest.mark.timeout(300)
def test_stop_names_the_step_and_the_rank_under_zero2(dataset, tmp_path) -> None:
    job = _with_zero(_job(dataset, tmp_path, max_steps=4, lr=3e-3), 2)
    with pytest.raises(
        NonFiniteError, match=rf"step {POISONED}: non-finite loss on rank\(s\) \[0\]"
    ):
        _run_poisoned(job)
    assert not list(tmp_path.glob("checkpoint_*"))
