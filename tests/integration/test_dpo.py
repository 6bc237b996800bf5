"""DPO numerics, reference log-probs, resume and export, with real DeepSpeed on CPU.

The session corpus's preference pairs through `data prepare` (seq_len 128, unpadded pairs of
different lengths); the policy starts from a tiny random Llama saved as a HF dir, and the reference
of the full fine-tuning runs is another one (so the DPO logits are not 0 at step 1 and the
reference log-probs, computed by the Ray Data job, shape the gradient). raylm's per-worker loop on
local processes (``tests.mp_loop``, gloo, no Ray Train) runs:
- ``z0`` 1 rank x 4 accumulation steps, ZeRO-0 (``before_update`` saves step 1's gradient);
- ``s22`` 2 ranks x 2 and ``s41`` 4 ranks x 1, ZeRO-0, one step each (the same 4 pairs split
  otherwise);
- ``z2`` / ``z3``: 2 ranks under ZeRO-2 / ZeRO-3, the same steps as ``z0``;
- ``lora_pre`` / ``lora_off``: LoRA with the base as reference, precomputed by Ray Data or computed
  in the worker with the adapter switched off;
- ``resumed``: a copy of ``z3`` without its last checkpoint, resumed from step 2.
DPO through Ray Train is the quickstart's preference stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster.config import load_config
from tests.conftest import prepare_data
from tests.faults import SaveGrads
from tests.mp_loop import run_loop
from training.data import MixedRows
from training.launcher import plan_job, run_dir
from training.loop import WorkerHooks
from training.records import read_events
from training.reference import ensure_references, read_reference

pytestmark = pytest.mark.timeout(900)
SEQ, PAIRS, STEPS = 128, 4, 3
BETA, SMOOTHING, SFT_WEIGHT = 0.5, 0.1, 0.5


def _save_model(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    from training.config import ModelConfig
    from training.model import build_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # init_std 0.2: a prompt-dependent, far from uniform model, as a trained one is.
    model = build_model(ModelConfig(init_std=0.2), len(tok), torch.float32, seed=seed)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def pairs(ray_local, synth_corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared_preference")
    return prepare_data(tokenizer_dir, inputs=[str(synth_corpus / "preference" / "train")],
                        output=str(out), mode="preference", seq_len=SEQ,
                        validation_fraction=0.1)  # fmt: skip


@pytest.fixture(scope="module")
def models(tokenizer_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(policy start, another model as the reference)."""
    root = tmp_path_factory.mktemp("dpo_models")
    return _save_model(tokenizer_dir, root / "base", 1), _save_model(tokenizer_dir, root / "ref", 2)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dpo_runs")


def _cfg(pairs, models, storage: Path, name: str, *overrides: str):
    base, ref = models
    return load_config(None, [
        f"name={name}",
        "train.task=dpo",
        f"train.datasets=[{pairs.output}]",
        f"train.storage_path={storage}",
        f"model.init_from={base}",
        f"train.dpo.reference_model={ref}",
        f"train.dpo.beta={BETA}",
        f"train.dpo.label_smoothing={SMOOTHING}",
        f"train.dpo.sft_weight={SFT_WEIGHT}",
        f"train.global_batch_tokens={SEQ * PAIRS}",
        "train.micro_batch_size=1",
        f"train.max_steps={STEPS}",
        "train.lr=0.003",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_batches=2",
        "deepspeed.zero_stage=0",
        *overrides,
    ])  # fmt: skip


def _loop(cfg, world: int, hooks: WorkerHooks | None = None):
    """The planned job with its reference log-probs computed (Ray Data, once per reference), run
    on ``world`` local processes."""
    job = plan_job(cfg)
    ensure_references(job, cfg.scaling)
    run_loop(job, world, hooks)
    return cfg


def _rows(cfg) -> list[dict]:
    lines = (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def _losses(cfg) -> list[float]:
    return [r["loss"] for r in _rows(cfg)]


@pytest.fixture(scope="module")
def z0(pairs, models, storage):
    cfg = _cfg(pairs, models, storage, "z0")
    return _loop(cfg, 1, WorkerHooks(before_update=SaveGrads(str(run_dir(cfg) / "grads"))))


@pytest.fixture(scope="module")
def z3(pairs, models, storage):
    return _loop(_cfg(pairs, models, storage, "z3", "scaling.num_workers=2",
                      "deepspeed.zero_stage=3"), 2)  # fmt: skip


def _split(pairs, models, storage, world: int):
    cfg = _cfg(pairs, models, storage, f"s{world}", f"scaling.num_workers={world}",
               "train.max_steps=1")  # fmt: skip
    return _loop(cfg, world, WorkerHooks(before_update=SaveGrads(str(run_dir(cfg) / "grads"))))


def _lora(pairs, models, storage, name: str, reference: str):
    base, _ = models
    cfg = _cfg(pairs, models, storage, name, f"train.dpo.reference_model={base}",
               "train.lora.enabled=true", f"train.dpo.reference={reference}", "train.lr=0.01")  # fmt: skip
    return _loop(cfg, 1)


# ---------------------------------------------------------------- in-process reference


def _step_pairs(cfg) -> dict[str, np.ndarray]:
    """Step 1's pairs, whatever the split."""
    job = plan_job(cfg)
    data = MixedRows(job.datasets, job.weights, job.seed, PAIRS, PAIRS, 1, 0)
    (batch,) = next(data.iter_steps(0, 1))
    return batch


def _logp(model, ids: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """Sum of log p(label) over the labelled tokens of one unpadded sequence."""
    t = torch.tensor(ids, dtype=torch.long)[None]
    logp = torch.log_softmax(model(input_ids=t).logits[0, :-1].float(), dim=-1)
    target = torch.tensor(labels, dtype=torch.long)[1:]
    mask = target != -100
    return logp[mask].gather(-1, target[mask, None]).sum()


def _reference_step(cfg) -> tuple[float, dict[str, torch.Tensor]]:
    """Step 1's objective and gradient, written out: each side forwarded alone and unpadded,
    the conservative DPO loss averaged over the pairs, plus the chosen answers' NLL over their
    token count."""
    from training.config import ModelConfig
    from training.model import build_model

    base, ref = cfg.model.init_from, cfg.train.dpo.reference_model
    job = plan_job(cfg)
    policy = build_model(ModelConfig(init_from=base), job.vocab_size, torch.float32)
    reference = build_model(ModelConfig(init_from=ref), job.vocab_size, torch.float32)
    batch = _step_pairs(cfg)
    losses, nll, tokens = [], torch.zeros(()), 0
    for i in range(PAIRS):
        side = {s: (batch[f"{s}_input_ids"][i], batch[f"{s}_labels"][i])
                for s in ("chosen", "rejected")}  # fmt: skip
        pc, pr = (_logp(policy, *side[s]) for s in ("chosen", "rejected"))
        with torch.no_grad():
            rc, rr = (_logp(reference, *side[s]) for s in ("chosen", "rejected"))
        h = (pc - pr) - (rc - rr)
        losses.append(-(1 - SMOOTHING) * F.logsigmoid(BETA * h)
                      - SMOOTHING * F.logsigmoid(-BETA * h))  # fmt: skip
        nll = nll - pc
        tokens += int((np.asarray(side["chosen"][1])[1:] != -100).sum())
    loss = torch.stack(losses).mean() + SFT_WEIGHT * nll / tokens
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    return float(loss), grads


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5
    return num / sum(float(b[k].pow(2).sum()) for k in b) ** 0.5


def _grads(cfg) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir(cfg) / "grads" / "step1.safetensors"))


# ---------------------------------------------------------------- tests


def test_step_pairs_have_sides_of_different_lengths(z0) -> None:
    batch = _step_pairs(z0)
    lengths = [len(x) for s in ("chosen", "rejected") for x in batch[f"{s}_input_ids"]]
    assert len(set(lengths)) > 2  # padding differs between splits, or the test proves little


def test_first_step_equals_the_written_out_dpo_formula(z0) -> None:
    want_loss, want_grads = _reference_step(z0)
    first = _rows(z0)[0]
    assert first["loss"] == pytest.approx(want_loss, rel=1e-5)
    assert first["reward_margin"] != 0.0  # the reference is another model
    assert _rel_diff(_grads(z0), want_grads) < 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_gradient_does_not_depend_on_the_split(z0, pairs, models, storage, world) -> None:
    """1 rank x 4 accumulation steps (z0), 2 x 2 and 4 x 1: the same gradient and loss."""
    cfg = _split(pairs, models, storage, world)
    assert _rel_diff(_grads(cfg), _grads(z0)) < 1e-5
    assert _losses(cfg)[0] == pytest.approx(_losses(z0)[0], rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_under_zero_match_one_rank_zero0(z0, z3, pairs, models, storage, stage) -> None:
    cfg = z3 if stage == 3 else _loop(_cfg(pairs, models, storage, "z2", "scaling.num_workers=2",
                                           "deepspeed.zero_stage=2"), 2)  # fmt: skip
    got, ref = _rows(cfg), _rows(z0)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-5, abs=1e-7)
    # Steps 2 and 3 match only if both applied the same updates (z0's gradient is checked
    # against the formula above). Eval rows differ: each rank scores its own eval micro-batches.
    assert all(r["grad_norm"] > 0 for r in got)


def test_lora_starts_at_ln2_with_either_reference_and_both_agree(pairs, models, storage) -> None:
    """At step 1 the adapter is zero, so the policy is its reference: loss ln 2, rewards 0; the
    base scored once by Ray Data and the base with the adapter off in the worker then give the
    same losses all along."""
    pre = _lora(pairs, models, storage, "lora_pre", "precomputed")
    off = _lora(pairs, models, storage, "lora_off", "adapter_disabled")
    assert plan_job(off).reference == [] and len(plan_job(pre).reference) == 1
    for cfg in (pre, off):
        first = _rows(cfg)[0]
        assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["rewards_chosen"] == first["rewards_rejected"] == first["reward_margin"] == 0
    a, b = _rows(pre), _rows(off)
    for key in ("loss", "reward_margin", "eval_loss", "eval_reward_margin"):
        got, want = [r[key] for r in a if key in r], [r[key] for r in b if key in r]
        assert got and got == pytest.approx(want, rel=1e-5, abs=1e-7), key
    assert a[-1]["reward_margin"] > 0  # the adapter trained away from the reference


def test_reference_is_stored_by_row_id_and_reused(z0, pairs) -> None:
    job = plan_job(z0)
    (ref_dir,) = job.reference
    marker = json.loads((Path(ref_dir) / "reference.json").read_text())
    assert marker["rows"] == job.datasets[0].rows
    assert marker["reference_model"] == z0.train.dpo.reference_model
    before = (Path(ref_dir) / "train.parquet").stat().st_mtime_ns
    ensure_references(job, z0.scaling)  # a re-run finds it complete
    assert (Path(ref_dir) / "train.parquet").stat().st_mtime_ns == before
    ref = read_reference(ref_dir, "train")
    assert len(ref["ref_chosen_logp"]) == job.datasets[0].rows["train"]
    assert np.all(ref["ref_chosen_logp"] < 0) and np.all(ref["ref_rejected_logp"] < 0)


def test_resume_from_a_checkpoint_logs_what_the_uninterrupted_run_logged(
    z3, pairs, models, storage
) -> None:
    """z3's run dir as a worker death leaves it: the step-2 checkpoint, the rows of step 3 logged
    but its checkpoint never written. The same job resumes from step 2 (reference log-probs joined
    to the rows again by row id) and logs what z3 logged. Ray Train's restart of a killed group is
    test_train_resume's `fault` run; this is the DPO state that the restart resumes."""
    import shutil

    cfg = _cfg(pairs, models, storage, "resumed", "scaling.num_workers=2",
               "deepspeed.zero_stage=3")  # fmt: skip
    rd = run_dir(cfg)
    shutil.copytree(run_dir(z3), rd)
    shutil.rmtree(rd / f"checkpoint_{STEPS:08d}")
    _loop(cfg, 2)
    resumes = [(e["step"], Path(e["checkpoint"]).name) for e in read_events(rd)
               if e["event"] == "resume"]  # fmt: skip
    assert resumes == [(2, "checkpoint_00000002")]
    got, ref = _rows(cfg), _rows(z3)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in ("loss", "reward_margin", "reward_accuracy"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-6, abs=1e-9)
    assert got[-1]["eval_reward_margin"] == pytest.approx(ref[-1]["eval_reward_margin"], rel=1e-6)
    assert (rd / f"checkpoint_{STEPS:08d}").is_dir()


def test_export_scores_held_out_pairs_in_raylm_eval(z0, synth_corpus, tmp_path) -> None:
    """The DPO run exports like any other; `raylm eval`'s preference task on the exported model
    equals the log-probs written out by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.evaluate import run_eval
    from data_pipelines.tokenize import encode_conversation
    from training.config import EvalConfig
    from training.export import export

    out = export(run_dir(z0), tmp_path / "hf")
    heldout = synth_corpus / "preference" / "heldout" / "style.jsonl"
    ecfg = EvalConfig(model=str(out), preference_data=[str(heldout)], limit_per_task=24,
                      output=str(tmp_path / "eval"), samples=24, max_new_tokens=8)  # fmt: skip
    report = run_eval(ecfg, "dpo")
    (entry,) = report["preference"]
    assert entry["n"] == 24 and set(entry["metrics"]) == {
        "win_rate", "margin", "greedy_chosen", "greedy_rejected"}  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    wins = []
    for sample in entry["samples"]:
        with torch.no_grad():
            lp = [_logp(model, *encode_conversation(tok, [
                {"role": "user", "content": sample["prompt"]},
                {"role": "assistant", "content": sample[side]}], last_only=True))
                  for side in ("chosen", "rejected")]  # fmt: skip
        assert sample["logp_chosen"] == pytest.approx(float(lp[0]), abs=1e-3)
        assert sample["logp_rejected"] == pytest.approx(float(lp[1]), abs=1e-3)
        wins.append(float(lp[0]) > float(lp[1]))
    assert entry["metrics"]["win_rate"] == pytest.approx(100 * np.mean(wins))
