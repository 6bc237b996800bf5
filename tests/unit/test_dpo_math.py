"""DPO's pure parts: collation of unpadded pairs, sequence log-probs, the loss formulas, the
reference scorer without Ray, reading pairs with their reference log-probs, and the driver-side
checks of a DPO run (all before any worker starts)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from cluster.config import ConfigError, load_config
from training.config import ModelConfig
from training.data import MixedRows, dataset_info, validation_batches
from training.dpo import collate_pairs, dpo_losses, pair_scores, reference_logps, sequence_logps
from training.errors import TrainConfigError
from training.model import build_model
from training.reference import MARKER_NAME, ReferenceLogps
from training.synthetic import write_synthetic_preference

VOCAB, SEQ = 64, 32


@pytest.fixture(scope="module")
def pref(tmp_path_factory) -> Path:
    return write_synthetic_preference(tmp_path_factory.mktemp("pref") / "ds", train_rows=24,
                                      validation_rows=8, seq_len=SEQ, vocab_size=VOCAB)  # fmt: skip


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, pref) -> Path:
    """A tiny Llama saved as a HF dir with the dataset's tokenizer: what model.init_from takes."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("base")
    model = build_model(ModelConfig(max_position_embeddings=64), VOCAB, torch.float32, seed=3)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(pref / "tokenizer")).save_pretrained(str(out))
    return out


def _model(seed: int = 3) -> torch.nn.Module:
    return build_model(ModelConfig(max_position_embeddings=64), VOCAB, torch.float32, seed=seed)


def _tensors(cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in cols.items()}


def _one_step_rows(pref: Path, rows: int = 4) -> dict[str, np.ndarray]:
    (batch,) = next(
        MixedRows([dataset_info(str(pref))], [1.0], 0, rows, rows, 1, 0).iter_steps(0, 1)
    )
    return batch


# ---------------------------------------------------------------- collation and log-probs


def test_collate_pads_each_side_at_its_end_chosen_first() -> None:
    batch = {
        "chosen_input_ids": [np.array([5, 6, 7]), np.array([5, 6])],
        "chosen_labels": [np.array([-100, 6, 7]), np.array([-100, 6])],
        "rejected_input_ids": [np.array([5, 8, 9, 10]), np.array([5, 9])],
        "rejected_labels": [np.array([-100, 8, 9, 10]), np.array([-100, 9])],
        "ref_chosen_logp": [-1.0, -2.0],
        "ref_rejected_logp": [-3.0, -4.0],
    }
    out = collate_pairs(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0], [5, 6, 0, 0], [5, 8, 9, 10], [5, 9, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7, -100], [-100, 6, -100, -100],
                                      [-100, 8, 9, 10], [-100, 9, -100, -100]]  # fmt: skip
    # Positions 0..n-1, the padding tail its own segment from 0 (as packed rows pad).
    assert out["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 3], [0, 1, 0, 1]]
    assert out["ref_chosen_logp"].tolist() == [-1.0, -2.0]
    assert collate_pairs(batch, 0, pad_to=6)["input_ids"].shape == (4, 6)
    with pytest.raises(ValueError, match="pad_to=3"):
        collate_pairs(batch, 0, pad_to=3)


def test_sequence_logps_sum_labelled_tokens_whatever_the_padding_or_chunking(pref) -> None:
    model = _model()
    batch = _one_step_rows(pref)
    t = _tensors(collate_pairs(batch, 0))
    logits = model(input_ids=t["input_ids"], position_ids=t["position_ids"]).logits
    got, counts = sequence_logps(logits, t["labels"])
    chunked, _ = sequence_logps(logits, t["labels"], chunk_tokens=8)
    for i in range(len(got)):  # each sequence alone, unpadded, by the textbook formula
        side = "chosen" if i < 4 else "rejected"
        ids = torch.tensor(batch[f"{side}_input_ids"][i % 4], dtype=torch.long)[None]
        labels = torch.tensor(batch[f"{side}_labels"][i % 4], dtype=torch.long)[None]
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        mask = labels[0, 1:] != -100
        want = lp.gather(-1, ids[0, 1:, None]).squeeze(-1)[mask].sum()
        assert float(got[i].detach()) == pytest.approx(float(want.detach()), abs=1e-4)
        assert int(counts[i]) == int(mask.sum())
    assert torch.allclose(got, chunked, atol=1e-5)
    # Gradients through the chunked (recomputed) path equal the one-shot path's.
    g1 = torch.autograd.grad(got.sum(), logits, retain_graph=True)[0]
    g2 = torch.autograd.grad(chunked.sum(), logits)[0]
    assert torch.allclose(g1, g2, atol=1e-6)


# ---------------------------------------------------------------- loss formulas


def test_dpo_loss_formulas() -> None:
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    h = (pc - pr) - (rc - rr)
    losses, cr, rj = dpo_losses(pc, pr, rc, rr, beta=0.5)
    assert torch.allclose(losses, -F.logsigmoid(0.5 * h))
    assert torch.allclose(cr, 0.5 * (pc - rc)) and torch.allclose(rj, 0.5 * (pr - rr))
    smooth, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    want = -0.8 * F.logsigmoid(0.5 * h) - 0.2 * F.logsigmoid(-0.5 * h)
    assert torch.allclose(smooth, want)
    ipo, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.5, loss="ipo")
    assert torch.allclose(ipo, (h - 1.0) ** 2)
    same, cr, rj = dpo_losses(pc, pr, pc, pr, beta=0.1)
    assert same.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    assert cr.tolist() == rj.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_losses(pc, pr, rc, rr, beta=0.1, loss="hinge")


def test_policy_equal_to_reference_scores_ln2_and_zero_rewards(pref) -> None:
    model = _model()
    t = _tensors(collate_pairs(_one_step_rows(pref), 0))
    s = pair_scores(model, t, reference_logps(model, t), beta=0.1)
    assert s.losses.tolist() == pytest.approx([math.log(2)] * 4, abs=1e-6)
    assert float(s.chosen_rewards) == float(s.rejected_rewards) == float(s.correct) == 0.0
    ipo = pair_scores(model, t, reference_logps(model, t), beta=0.1, loss="ipo")
    assert ipo.losses.tolist() == pytest.approx([25.0] * 4)  # (0 - 1/(2 x 0.1))^2


# ---------------------------------------------------------------- reference scorer and reader


def test_reference_scorer_equals_the_workers_scoring(pref, base_dir) -> None:
    model = ModelConfig(init_from=str(base_dir)).model_dump(mode="json")
    batch = _one_step_rows(pref)
    batch = {k: v[np.argsort(batch["row_id"])] for k, v in batch.items()}  # as a file's block
    n = len(batch["row_id"])
    out = ReferenceLogps(model, VOCAB, seed=0, precision="fp32", pad_id=0, batch_size=n)(batch)
    assert out["row_id"].tolist() == batch["row_id"].tolist()
    t = _tensors(collate_pairs(batch, 0))
    chosen, rejected = reference_logps(_model(), t)  # the saved model, built the same way
    assert out["chosen_logp"].tolist() == chosen.double().tolist()
    assert out["rejected_logp"].tolist() == rejected.double().tolist()
    # A block is scored batch_size rows at a time, each batch padded on its own.
    pairs = ReferenceLogps(model, VOCAB, seed=0, precision="fp32", pad_id=0, batch_size=2)(batch)
    for i in range(0, n, 2):
        part = _tensors(collate_pairs({k: v[i : i + 2] for k, v in batch.items()}, 0))
        chosen, rejected = reference_logps(_model(), part)
        assert pairs["chosen_logp"][i : i + 2].tolist() == chosen.double().tolist()
        assert pairs["rejected_logp"][i : i + 2].tolist() == rejected.double().tolist()


def _write_reference(pref: Path, ref_dir: Path) -> None:
    """A reference dir as training.reference writes it, with made-up values: 1000 + row_id."""
    info = dataset_info(str(pref))
    ref_dir.mkdir(parents=True)
    for split in ("train", "validation"):
        ids = np.arange(info.rows[split])
        pq.write_table(pa.table({"row_id": ids, "chosen_logp": 1000.0 + ids,
                                 "rejected_logp": -1000.0 - ids}), ref_dir / f"{split}.parquet")  # fmt: skip
    (ref_dir / MARKER_NAME).write_text("{}")


def test_pairs_are_read_ragged_with_their_reference_log_probs(pref, tmp_path) -> None:
    ref = tmp_path / "ref"
    _write_reference(pref, ref)
    info = dataset_info(str(pref))
    data = MixedRows([info], [1.0], 0, 8, 2, 2, 1, references=[str(ref)])
    steps = list(data.iter_steps(0, data.steps_per_epoch))
    seen = set()
    for mbs in steps:
        for mb in mbs:
            assert mb["chosen_input_ids"].dtype == object  # unpadded, lengths differ
            assert mb["ref_chosen_logp"].tolist() == (1000.0 + mb["row_id"]).tolist()
            assert mb["ref_rejected_logp"].tolist() == (-1000.0 - mb["row_id"]).tolist()
            seen.update(mb["row_id"].tolist())
    assert len({len(x) for mbs in steps for mb in mbs for x in mb["rejected_input_ids"]}) > 1
    assert len(seen) == 12  # rank 1 of 2: half of the epoch's 24 pairs, each once
    val = validation_batches([info], 2, 1, 0, 8, references=[str(ref)])
    assert [v["ref_chosen_logp"].tolist() for v in val][0] == [1000.0, 1001.0]
    (ref / MARKER_NAME).unlink()  # an incomplete reference is refused, naming the dir
    with pytest.raises(TrainConfigError, match="reference log-probs missing"):
        MixedRows([info], [1.0], 0, 8, 2, 2, 1, references=[str(ref)])


# ---------------------------------------------------------------- driver-side checks


def _cfg(pref: Path, tmp_path: Path, *overrides: str):
    return load_config(None, [f"train.datasets=[{pref}]", f"train.storage_path={tmp_path}",
                              f"train.global_batch_tokens={SEQ * 8}", "train.micro_batch_size=2",
                              "train.task=dpo", *overrides])  # fmt: skip


def test_reference_mode_is_resolved_on_the_driver(pref, base_dir, tmp_path) -> None:
    from training.launcher import plan_job

    full = plan_job(_cfg(pref, tmp_path, f"model.init_from={base_dir}"))
    assert full.train.dpo.reference == "precomputed"
    assert full.train.dpo.reference_model == str(base_dir.resolve())
    (ref,) = full.reference
    assert Path(ref).parent == pref.resolve() / "reference" and len(Path(ref).name) == 16
    assert full.resume_keys["train.dpo"]["beta"] == 0.1
    lora = plan_job(_cfg(pref, tmp_path, f"model.init_from={base_dir}", "train.lora.enabled=true"))
    assert lora.train.dpo.reference == "adapter_disabled" and lora.reference == []
    again = plan_job(_cfg(pref, tmp_path, f"model.init_from={base_dir}", "seed=1"))
    assert again.reference != full.reference  # the seed draws grown embedding rows: another key


def test_sft_and_pretrain_hashes_ignore_the_dpo_section(tmp_path) -> None:
    from training.launcher import plan_job
    from training.synthetic import write_synthetic_dataset

    ds = write_synthetic_dataset(tmp_path / "ds", train_rows=16, seq_len=16)
    base = [f"train.datasets=[{ds}]", f"train.storage_path={tmp_path}",
            "train.global_batch_tokens=64"]  # fmt: skip
    a = plan_job(load_config(None, base))
    b = plan_job(load_config(None, [*base, "train.dpo.beta=0.5"]))
    assert a.config_hash == b.config_hash and "train.dpo" not in a.resume_keys


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ([], r"model\.init_from: train\.task dpo starts from a trained model"),
        (["train.dpo.reference=adapter_disabled", "INIT"], r"train\.dpo\.reference: .*LoRA"),
        (["train.dpo.reference_model=/nonexistent/ref", "INIT"],
         r"train\.dpo\.reference_model: /nonexistent/ref does not exist"),
        (["train.lora.enabled=true", "train.dpo.reference=adapter_disabled", "INIT", "OTHER"],
         r"train\.dpo\.reference: adapter_disabled scores with model\.init_from"),
    ],
)  # fmt: skip
def test_bad_dpo_runs_are_refused_before_workers(
    pref, base_dir, tmp_path, overrides, match
) -> None:
    from training.launcher import plan_job

    other = tmp_path / "other"
    if "OTHER" in overrides:
        import shutil

        shutil.copytree(base_dir, other)
    subs = {"INIT": f"model.init_from={base_dir}", "OTHER": f"train.dpo.reference_model={other}"}
    cfg = _cfg(pref, tmp_path, *[subs.get(o, o) for o in overrides])
    with pytest.raises(TrainConfigError, match=match):
        plan_job(cfg)


def test_dpo_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.dpo: .*label_smoothing applies to the sigmoid"):
        load_config(None, ["train.dpo.loss=ipo", "train.dpo.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match=r"train\.dpo\.beta"):
        load_config(None, ["train.dpo.beta=0"])
    with pytest.raises(ConfigError, match=r"train\.dpo\.loss"):
        load_config(None, ["train.dpo.loss=hinge"])


@pytest.mark.timeout(300)
def test_lora_dpo_loop_starts_at_ln2_and_logs_rewards(pref, base_dir, tmp_path) -> None:
    """One rank, no Ray: LoRA with the base (adapter off) as reference. At step 1 the adapter is
    zero, so the policy is the reference: loss ln 2, rewards and margin 0."""
    from training.launcher import plan_job
    from training.loop import WorkerIO, run_worker

    cfg = _cfg(pref, tmp_path, f"model.init_from={base_dir}", "train.lora.enabled=true",
               "train.max_steps=3", "train.log_every=1", "train.warmup_steps=0", "train.lr=0.01",
               "train.checkpoint_every=100", "deepspeed.zero_stage=0", "train.dpo.sft_weight=0.5",
               "train.eval_batches=2")  # fmt: skip
    job = plan_job(cfg)
    run_worker(job, WorkerIO(0, 1, lambda *a, **k: None))
    rows = [json.loads(x) for x in (Path(job.run_dir) / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["chosen_nll"], abs=1e-5)
    assert first["rewards_chosen"] == first["rewards_rejected"] == first["reward_margin"] == 0.0
    assert last["step"] == 3 and last["dpo_loss"] < first["dpo_loss"]
    assert last["reward_margin"] > 0 and 0 <= last["reward_accuracy"] <= 1
    for key in ("eval_loss", "eval_dpo_loss", "perplexity", "eval_reward_accuracy",
                "eval_reward_margin", "eval_rewards_chosen", "eval_rewards_rejected"):  # fmt: skip
        assert math.isfinite(last[key]), key
    # tokens_seen counts real tokens of both sides (no padding): three steps of 8 pairs.
    assert 3 * 8 * 2 * 4 < last["tokens_seen"] < 3 * 8 * 2 * SEQ


def test_eval_preference_records_errors_name_file_and_line(tmp_path) -> None:
    from training.evaluate import EvalError, read_preference_file

    good = {"prompt": "Q?", "chosen": "a", "rejected": "b"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "chosen": "b"}) + "\n")
    with pytest.raises(EvalError, match=rf"{path}:3: identical_answers: 'chosen' and 'rejected'"):
        read_preference_file(str(path), "eval.preference_data[0]")
    path.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(EvalError, match=rf"{path}:2: invalid JSON"):
        read_preference_file(str(path), "eval.preference_data[0]")
    with pytest.raises(EvalError, match=r"eval\.preference_data\[0\]: .*: no such file"):
        read_preference_file(str(tmp_path / "none.jsonl"), "eval.preference_data[0]")
    path.write_text(json.dumps(good) + "\n")
    (rec,) = read_preference_file(str(path), "k")
    assert (rec.source, rec.prompt, rec.chosen, rec.rejected) == (
        f"{path}:1", [{"role": "user", "content": "Q?"}], "a", "b")  # fmt: skip
