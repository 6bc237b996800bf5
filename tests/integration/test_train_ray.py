"""`raylm train` on the shared local Ray instance: real Ray Train V2 workers, real DeepSpeed (gloo).

Tiny model (hidden 64, 2 layers), seq_len 32, 8 rows per step: each run is a few seconds of
training plus Ray/DeepSpeed start-up.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cluster.config import load_config
from training.checkpoint import verify_checkpoint
from training.launcher import plan_job, run_dir, train
from training.synthetic import write_synthetic_dataset

SEQ = 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("train_data") / "ds", train_rows=96,
                                   validation_rows=16, seq_len=SEQ, vocab_size=64)  # fmt: skip


def _cfg(prepared: Path, storage: Path, name: str, *overrides: str):
    base = [
        f"name={name}",
        f"train.datasets=[{prepared}]",
        f"train.storage_path={storage}",
        f"train.global_batch_tokens={SEQ * 8}",
        "train.micro_batch_size=2",
        "train.lr=0.003",
        "train.warmup_steps=2",
        "train.log_every=1",
        "scaling.num_workers=2",
    ]
    return load_config(None, base + list(overrides))


def _metrics(cfg) -> list[dict]:
    lines = (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


@pytest.mark.timeout(400)
def test_two_workers_zero2_learns_checkpoints_and_resumes(ray_local, prepared, tmp_path) -> None:
    cfg = _cfg(prepared, tmp_path, "z2", "deepspeed.zero_stage=2", "train.max_steps=8",
               "train.checkpoint_every=3", "train.eval_every=4", "train.keep_checkpoints=2")  # fmt: skip
    result = train(cfg)
    rows = _metrics(cfg)
    assert [r["step"] for r in rows] == list(range(1, 9))
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(0.0015)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.2, (first, last)
    assert evals[-1]["eval_loss"] < math.log(64)  # below uniform over the vocabulary

    # Checkpoints at 3, 6 and the end (8); Ray keeps the newest 2, each verifies.
    ckpts = sorted(p for p in run_dir(cfg).glob("checkpoint_*") if p.is_dir())
    assert [p.name for p in ckpts] == ["checkpoint_00000006", "checkpoint_00000008"]
    state = verify_checkpoint(ckpts[-1])
    assert state.step == 8 and state.world_size == 2 and state.tokens_seen == 8 * 8 * SEQ
    assert Path(result.checkpoint.path).name == "checkpoint_00000008"

    # Same name, more steps: resumes from step 8 instead of starting over.
    more = _cfg(prepared, tmp_path, "z2", "deepspeed.zero_stage=2", "train.max_steps=10",
                "train.checkpoint_every=3", "train.eval_every=4")  # fmt: skip
    # max_steps changes the schedule length only; the resume keys (shape, batch, world) match.
    train(more)
    rows = _metrics(more)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert verify_checkpoint(run_dir(more) / "checkpoint_00000010").step == 10


def test_bad_config_fails_before_workers(prepared, tmp_path) -> None:
    from training.errors import TrainConfigError

    cases = [
        (["train.datasets=[/nonexistent/ds]"], r"train\.datasets\[0\]\.path"),
        (["model.max_position_embeddings=16"], r"model\.max_position_embeddings"),
        (["model.vocab_size=32"], r"model\.vocab_size"),
        (["train.global_batch_tokens=100"], r"train\.global_batch_tokens"),
        (["scaling.num_workers=3"], r"scaling\.num_workers"),
        (["deepspeed.precision=fp16"], r"deepspeed\.precision"),
        (["train.nonfinite=skip", "deepspeed.zero_stage=0"], r"train\.nonfinite"),
    ]
    for overrides, key in cases:
        with pytest.raises(TrainConfigError, match=key):
            plan_job(_cfg(prepared, tmp_path, "bad", *overrides))


# ZeRO-3 vs ZeRO-0 numerics, ZeRO-3 partitioning, fault injection, resume and export:
# tests/integration/test_train_resume.py.
