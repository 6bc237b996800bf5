"""`raylm train` numerics, partitioned construction, metrics, fault injection, resume and export.

Module-scoped runs on the session's real `data prepare` output (seq_len 128, BPE tokenizer with
chat template), tiny model, 8 steps of 8 rows:
- ``z0``: 1 rank, ZeRO-0, the numerics reference, ``z1``: 2 ranks, ZeRO-1, and ``z3``: 2 ranks,
  ZeRO-3, uninterrupted, checkpoints every 3 steps: raylm's per-worker loop on local processes
  (``tests.mp_loop``, gloo), no Ray: numerics need no Ray Train run;
- ``fault``: ``z3``'s settings as 2 Ray Train workers with rank 1 SIGKILLed after step 5 and
  ``max_failures: 1``: it must log what the loop without Ray logged for ``z3``;
- ``z2``: 2 Ray Train workers, ZeRO-2, eval every 4 steps, rank 1 sent SIGTERM after step 3 (a
  preempted node), then the same call again, which resumes and finishes; its metrics rows,
  learning-rate warmup and checkpoint pruning are checked too.
The finished-run re-run test works on a copy of the fault run's dir (through `train`, which starts no
worker for it), the corrupt-checkpoint test on a copy of ``z3``'s (through the loop).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
from collections import Counter
from pathlib import Path

import pytest

from cluster.config import load_config
from tests.faults import KILLED_NAME, KillAt
from tests.mp_loop import run_loop
from training.checkpoint import verify_checkpoint
from training.errors import Preempted, TrainConfigError
from training.launcher import plan_job, run_dir, train
from training.loop import WorkerHooks
from training.records import read_events, read_row_ids
from training.runlock import LOCK_NAME

pytestmark = pytest.mark.timeout(600)
STEPS = 8


def _cfg(prepared, storage: Path, name: str, *overrides: str):
    base = [
        f"name={name}",
        f"train.datasets=[{prepared.output}]",
        f"train.storage_path={storage}",
        "train.global_batch_tokens=1024",  # 8 rows of 128
        "train.micro_batch_size=2",
        "train.lr=0.003",
        "train.warmup_steps=2",
        "train.log_every=1",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=3",
        "train.eval_batches=2",
        "scaling.num_workers=2",
        "deepspeed.zero_stage=3",
    ]
    return load_config(None, base + list(overrides))


def _run(cfg, hooks: WorkerHooks | None = None):
    """The same command every time: row ids recorded, as the audit tests need."""
    return train(cfg, dataclasses.replace(plan_job(cfg), record_row_ids=True), hooks)


def _metrics(path: Path) -> list[dict]:
    lines = (path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def z0(prepared_pretrain, storage):
    cfg = _cfg(prepared_pretrain, storage, "z0", "scaling.num_workers=1",
               "deepspeed.zero_stage=0", "train.checkpoint_every=100")  # fmt: skip
    run_loop(plan_job(cfg), world=1)
    return cfg


@pytest.fixture(scope="module")
def z3(prepared_pretrain, storage):
    cfg = _cfg(prepared_pretrain, storage, "z3")
    run_loop(dataclasses.replace(plan_job(cfg), record_row_ids=True), world=2)
    return cfg


@pytest.fixture(scope="module")
def fault(ray_local, prepared_pretrain, storage):
    cfg = _cfg(prepared_pretrain, storage, "fault", "scaling.max_failures=1")
    _run(cfg, WorkerHooks(after_step=KillAt(str(run_dir(cfg)), step=5, rank=1)))
    return cfg


@pytest.fixture(scope="module")
def z1(prepared_pretrain, storage):
    cfg = _cfg(prepared_pretrain, storage, "z1", "deepspeed.zero_stage=1",
               "train.checkpoint_every=100")  # fmt: skip
    run_loop(plan_job(cfg), world=2)
    return cfg


@pytest.fixture(scope="module")
def z2(ray_local, prepared_pretrain, storage):
    """(config, the Preempted error of the first call)."""
    cfg = _cfg(prepared_pretrain, storage, "z2", "deepspeed.zero_stage=2", "train.eval_every=4",
               "train.keep_checkpoints=2")  # fmt: skip
    term = KillAt(str(run_dir(cfg)), step=3, rank=1, signum=signal.SIGTERM)
    with pytest.raises(Preempted) as stop:
        train(cfg, hooks=WorkerHooks(after_step=term))
    result = train(cfg)
    return cfg, stop.value, result


@pytest.mark.parametrize("which", ["z1", "z2"])
def test_zero12_two_workers_match_zero0_one_worker(which, z0, request) -> None:
    cfg = request.getfixturevalue(which)
    cfg = cfg[0] if isinstance(cfg, tuple) else cfg
    ref = [r["loss"] for r in _metrics(run_dir(z0))]
    got = [r["loss"] for r in _metrics(run_dir(cfg))]
    assert len(got) == STEPS and got == pytest.approx(ref, rel=1e-5)


def test_sigterm_to_one_worker_checkpoints_that_step_and_the_rerun_resumes(z2) -> None:
    cfg, stop, _ = z2
    rd = run_dir(cfg)
    assert (rd / KILLED_NAME).read_text() == "3"  # rank 1 got SIGTERM after step 3
    # Seen at the very next step boundary, by both ranks (else a collective would hang).
    assert stop.step == 3 and stop.reason == "SIGTERM to a worker"
    events = read_events(rd)
    assert [(e["event"], e["step"]) for e in events] == [("preempt", 3), ("resume", 3)]
    assert Path(events[1]["checkpoint"]).name == "checkpoint_00000003"
    assert verify_checkpoint(rd / f"checkpoint_{STEPS:08d}").step == STEPS


def test_metrics_rows_warmup_eval_and_kept_checkpoints(z2, z0) -> None:
    cfg, _, result = z2
    rows = _metrics(run_dir(cfg))
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "mfu"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(0.0015)  # warmup 2, lr 0.003
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert evals[-1]["eval_loss"] < math.log(plan_job(cfg).vocab_size)  # below uniform
    # Checkpoints at 3 (the preemption), 6 and the end (8); Ray keeps the newest 2, each verifies.
    ckpts = sorted(p.name for p in run_dir(cfg).glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_00000006", f"checkpoint_{STEPS:08d}"]
    state = verify_checkpoint(run_dir(cfg) / ckpts[-1])
    assert state.step == STEPS and state.world_size == 2 and state.tokens_seen == STEPS * 8 * 128
    assert Path(result.checkpoint.path).name == f"checkpoint_{STEPS:08d}"


def test_bad_config_fails_before_workers(prepared_pretrain, tmp_path) -> None:
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
            plan_job(_cfg(prepared_pretrain, tmp_path, "bad", *overrides))


def test_rerun_with_changed_run_settings_is_refused_before_workers(z0, prepared_pretrain) -> None:
    """z0 (seed 0, ZeRO-0, one worker) again under its name with another seed, ZeRO stage and
    task: refused on the driver naming each key, old -> new; the run dir is left as it was."""
    before = (run_dir(z0) / "metrics.jsonl").read_bytes()
    cfg = _cfg(prepared_pretrain, run_dir(z0).parent, "z0", "scaling.num_workers=1",
               "train.checkpoint_every=100", "seed=1", "deepspeed.zero_stage=1")  # fmt: skip
    with pytest.raises(TrainConfigError) as err:
        train(cfg)
    msg = str(err.value)
    assert "seed (0 -> 1)" in msg and "deepspeed.zero_stage (0 -> 1)" in msg
    assert "train.task" not in msg and "--set name=" in msg
    assert (run_dir(z0) / "metrics.jsonl").read_bytes() == before


def test_zero3_two_workers_match_zero0_one_worker(z0, z3) -> None:
    """Same seed, data and global batch: fp32 losses agree over every step."""
    ref = [r["loss"] for r in _metrics(run_dir(z0))]
    got = [r["loss"] for r in _metrics(run_dir(z3))]
    assert len(ref) == len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-5)
    assert ref[-1] < ref[0] - 0.1  # it trained (a frozen model would also "match")


def test_zero3_ranks_hold_a_partition_after_construction(z0, z3) -> None:
    full = json.loads((run_dir(z0) / "workers" / "rank_0.json").read_text())
    assert full["local_params"] == full["total_params"] > 0
    for rank in (0, 1):
        info = json.loads((run_dir(z3) / "workers" / f"rank_{rank}.json").read_text())
        assert info["world_size"] == 2 and info["total_params"] == full["total_params"]
        # ZeRO-3 pads each parameter to a multiple of the world size: at most 1 extra element each.
        assert full["total_params"] / 2 <= info["local_params"] <= full["total_params"] / 2 + 64


def test_killed_worker_restarts_from_checkpoint_with_identical_losses(z3, fault) -> None:
    rd = run_dir(fault)
    assert (rd / KILLED_NAME).read_text() == "5"  # the kill happened
    resumes = [e for e in read_events(rd) if e["event"] == "resume"]
    assert [(e["step"], Path(e["checkpoint"]).name) for e in resumes] == [
        (3, "checkpoint_00000003")
    ]
    ref, got = _metrics(run_dir(z3)), _metrics(rd)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # steps 4-5 logged once
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    assert got[-1]["eval_loss"] == pytest.approx(ref[-1]["eval_loss"], rel=1e-6)
    assert verify_checkpoint(rd / "checkpoint_00000008").step == STEPS


def test_row_ids_after_restart_equal_uninterrupted_run(z3, fault) -> None:
    ref, got = read_row_ids(run_dir(z3)), read_row_ids(run_dir(fault))
    assert sorted(ref) == sorted(got) == [0, 1]
    flat = {name: Counter(i for rank in ids.values() for step in rank.values() for i in step)
            for name, ids in (("ref", ref), ("got", got))}  # fmt: skip
    assert flat["got"] == flat["ref"]
    assert sum(flat["ref"].values()) == STEPS * 8
    assert max(flat["ref"].values()) == 1  # one epoch's slice: nothing trained twice
    assert got == ref  # and each rank saw the same rows at the same step


def _copy_run(cfg, tmp_path: Path, prepared, *overrides: str):
    copy = _cfg(prepared, tmp_path, cfg.name, "scaling.max_failures=1", *overrides)
    shutil.copytree(run_dir(cfg), run_dir(copy))
    return copy


def test_rerun_of_a_finished_run_starts_no_worker_and_still_exports(
    fault, prepared_pretrain, tmp_path
) -> None:
    from training.launcher import FinishedRun

    export = tmp_path / "hf"
    cfg = _copy_run(fault, tmp_path, prepared_pretrain, f"train.export_dir={export}")
    rd = run_dir(cfg)

    def files() -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(rd)): (p.stat().st_size, p.stat().st_mtime_ns)
                for p in rd.rglob("*")
                if p.is_file() and p.name not in ("events.jsonl", LOCK_NAME)}  # fmt: skip

    before = files()
    result = _run(cfg)
    assert isinstance(result, FinishedRun) and result.step == STEPS
    assert Path(result.checkpoint.path).name == "checkpoint_00000008"
    last = read_events(rd)[-1]
    assert (last["event"], last["step"], last["finished"]) == ("resume", STEPS, True)
    assert Path(last["checkpoint"]).name == "checkpoint_00000008" and last["skipped"] == []
    # No worker ran: no file of the run dir but the events and the driver's lock was written (a
    # worker rewrites workers/rank_N.json, trims metrics.jsonl and the row-id records at start).
    assert files() == before
    assert json.loads((export / "provenance.json").read_text())["step"] == STEPS


def test_truncated_latest_checkpoint_falls_back_to_previous(
    z3, prepared_pretrain, tmp_path
) -> None:
    """A copy of z3 with its last checkpoint cut short, resumed by the loop (as Ray Train's
    workers run it, from the run dir's checkpoints newest first)."""
    cfg = _copy_run(z3, tmp_path, prepared_pretrain)
    latest = run_dir(cfg) / "checkpoint_00000008"
    victim = next(latest.glob("global_step8/*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])  # a partial upload
    run_loop(dataclasses.replace(plan_job(cfg), record_row_ids=True), world=2)
    last = read_events(run_dir(cfg))[-1]
    assert (last["event"], last["step"]) == ("resume", 6)
    assert Path(last["checkpoint"]).name == "checkpoint_00000006"
    assert len(last["skipped"]) == 1 and "checkpoint_00000008" in last["skipped"][0]
    assert victim.name in last["skipped"][0]
    got, ref = _metrics(run_dir(cfg)), _metrics(run_dir(z3))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
    # Steps 7-8 trained again are stored apart from the broken checkpoint, complete (Ray prunes
    # that entry later; a fresh checkpoint of the same name would go with it).
    assert verify_checkpoint(run_dir(cfg) / "checkpoint_00000008_from00000006").step == STEPS
    assert read_row_ids(run_dir(cfg)) == read_row_ids(run_dir(z3))


@pytest.mark.parametrize("which", ["z3", "z0"])
def test_export_round_trip_matches_trained_engine(which, z0, z3, tmp_path) -> None:
    """A 2-worker ZeRO-3 (and a ZeRO-0) run exports on one CPU process; the export's held-out
    loss equals the engine's eval loss at that checkpoint, and the chat template works."""
    from transformers import AutoTokenizer

    from tests.unit.test_train_export import exported_eval_loss
    from training.export import export

    cfg = {"z0": z0, "z3": z3}[which]
    out = export(run_dir(cfg), tmp_path / "hf")
    job = plan_job(cfg)
    got = exported_eval_loss(out, job.datasets, cfg.scaling.num_workers,
                             cfg.train.micro_batch_size, cfg.train.eval_batches, job.pad_id)  # fmt: skip
    final = _metrics(run_dir(cfg))[-1]
    assert final["step"] == STEPS and got == pytest.approx(final["eval_loss"], rel=1e-5)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    msgs = [{"role": "user", "content": "hello"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>\nhello<|end|><|assistant|>\n"
    gen = json.loads((out / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|end|>") in gen["eos_token_id"]
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["step"] == STEPS and prov["seed"] == cfg.seed
    assert list(prov["manifest_sha256"]) == [job.datasets[0].path]
