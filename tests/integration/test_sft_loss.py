"""SFT loss normalization: the gradient of one optimizer step does not depend on how its rows are
split over ranks and accumulation steps.

raylm's per-worker loop on local processes (``tests.mp_loop``: gloo, real DeepSpeed ZeRO-0, fp32,
no Ray: the split is the loop's business) on the session's packed SFT data, whose rows carry very
different numbers of assistant (loss) tokens. Three ways to split the same 4 rows:
1 worker x 4 accumulation steps, 2 workers x 2, 4 workers x 1 micro-batch. Rank 0 dumps the
reduced gradient before the optimizer step (a ``SaveGrads`` hook); all three must equal the in-process
gradient of the whole batch, (sum of token losses) / (loss-token count), and a control computed as
the mean of per-micro-batch means must differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import load_config
from tests.faults import SaveGrads
from tests.mp_loop import run_loop
from training.batch import forward_packed, loss_targets, token_loss
from training.data import MixedRows
from training.launcher import plan_job, run_dir
from training.loop import WorkerHooks
from training.model import build_model

pytestmark = pytest.mark.timeout(600)
SEQ = 128
ROWS = 4
SPLITS = {"1x4": (1, 1), "2x2": (2, 1), "4x1": (4, 1)}  # (workers, micro-batch rows)


def _cfg(prepared_sft, storage: Path, name: str, world: int, micro: int):
    return load_config(None, [
        f"name={name}",
        "train.task=sft",
        f"train.datasets=[{prepared_sft.output}]",
        f"train.storage_path={storage}",
        f"train.global_batch_tokens={SEQ * ROWS}",
        f"train.micro_batch_size={micro}",
        "train.max_steps=1",
        "train.warmup_steps=0",
        "deepspeed.zero_stage=0",
        f"scaling.num_workers={world}",
    ])  # fmt: skip


@pytest.fixture(scope="module")
def grads(prepared_sft, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    storage = tmp_path_factory.mktemp("sft_grads")
    out = {}
    for name, (world, micro) in SPLITS.items():
        cfg = _cfg(prepared_sft, storage, name, world, micro)
        hooks = WorkerHooks(before_update=SaveGrads(str(run_dir(cfg) / "grads")))
        run_loop(plan_job(cfg), world, hooks)
        out[name] = load_file(str(run_dir(cfg) / "grads" / "step1.safetensors"))
    return out


def _step_rows(prepared_sft, storage: Path) -> tuple[dict[str, np.ndarray], object]:
    """The 4 rows of step 1 (whatever the split) and the planned job."""
    job = plan_job(_cfg(prepared_sft, storage, "reference", 1, ROWS))
    data = MixedRows(job.datasets, job.weights, job.seed, ROWS, ROWS, 1, 0)
    (batch,) = next(data.iter_steps(0, 1))
    return batch, job


def _reference_grads(batch, job, mean_of_means: bool) -> dict[str, torch.Tensor]:
    """In-process gradient of the same step: global token mean, or the mean of per-row means."""
    model = build_model(job.model, job.vocab_size, torch.float32, seed=job.seed)
    t = {k: torch.from_numpy(np.asarray(v)).long() for k, v in batch.items()}
    targets = loss_targets(t["input_ids"], t["position_ids"], job.pad_id, t["labels"])
    logits = forward_packed(model, t["input_ids"], t["position_ids"])
    if mean_of_means:
        losses = [token_loss(logits[i : i + 1], targets[i : i + 1]) for i in range(ROWS)]
        loss = torch.stack([s / c for s, c in losses]).mean()
    else:
        total, count = token_loss(logits, targets)
        loss = total / count
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    den = sum(float(b[k].pow(2).sum()) for k in b) ** 0.5
    return num / den


def test_step_rows_have_uneven_loss_token_counts(prepared_sft, tmp_path) -> None:
    batch, job = _step_rows(prepared_sft, tmp_path)
    counts = (np.asarray(batch["labels"])[:, 1:] != -100).sum(axis=1)
    assert len(set(counts.tolist())) > 1, counts  # otherwise the control below proves nothing


@pytest.mark.parametrize("split", SPLITS)
def test_gradient_equals_whole_batch_token_mean_for_every_split(
    grads, prepared_sft, tmp_path, split
) -> None:
    batch, job = _step_rows(prepared_sft, tmp_path)
    exact = _reference_grads(batch, job, mean_of_means=False)
    assert _rel_diff(grads[split], exact) < 1e-5


def test_mean_of_micro_batch_means_differs(grads, prepared_sft, tmp_path) -> None:
    batch, job = _step_rows(prepared_sft, tmp_path)
    control = _reference_grads(batch, job, mean_of_means=True)
    # The split-dependent normalization is measurably off, so the test above can fail.
    for split in SPLITS:
        assert _rel_diff(grads[split], control) > 1e-3, split
