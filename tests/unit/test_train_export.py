"""`raylm export` on checkpoints of the Ray-free loop (one process, gloo): files, numerics, errors.

The exported model's held-out loss must equal the eval loss the DeepSpeed engine reported at the
checkpoint's step (same validation micro-batches, fp32): any wrong, missing or transposed weight
would move it far beyond the tolerance.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from training.batch import forward_packed, loss_targets, token_loss
from training.config import DeepSpeedConfig, ModelConfig, TrainConfig
from training.data import dataset_info, validation_batches
from training.errors import CheckpointError
from training.export import PROVENANCE_NAME, export, find_checkpoint
from training.loop import WorkerIO, WorkerJob, run_worker
from training.synthetic import write_synthetic_dataset

SEQ, VOCAB = 32, 64


def exported_eval_loss(out: Path, datasets: list, world_size: int, micro_batch: int,
                       eval_batches: int, pad_id: int) -> float:  # fmt: skip
    """Held-out loss of an export over the batches every rank evaluated (as the loop does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    total = count = 0.0
    for rank in range(world_size):
        for mb in validation_batches(datasets, micro_batch, world_size, rank, eval_batches):
            ids = torch.from_numpy(mb["input_ids"]).long()
            pos = torch.from_numpy(mb["position_ids"]).long()
            with torch.no_grad():
                logits = forward_packed(model, ids, pos)
            s, n = token_loss(logits, loss_targets(ids, pos, pad_id))
            total, count = total + float(s), count + float(n)
    return total / count


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    ds = write_synthetic_dataset(root / "ds", train_rows=32, validation_rows=8, seq_len=SEQ,
                                 vocab_size=VOCAB)  # fmt: skip
    train = TrainConfig(global_batch_tokens=SEQ * 8, micro_batch_size=4, log_every=1, lr=3e-3,
                        warmup_steps=0, checkpoint_every=2, max_steps=3)  # fmt: skip
    job = WorkerJob(model=ModelConfig(), train=train, deepspeed=DeepSpeedConfig(zero_stage=3),
                    seed=0, run_dir=str(root / "run"), datasets=[dataset_info(str(ds))],
                    weights=[1.0], seq_len=SEQ, vocab_size=VOCAB, pad_id=0, total_steps=3,
                    config_hash="test", provenance={"seed": 0, "git_commit": "abc"})  # fmt: skip
    kept: list[Path] = []

    def report(metrics, checkpoint_dir, step, dir_name=None):  # keep checkpoints as Ray would
        if checkpoint_dir is not None:
            kept.append(root / "run" / dir_name)
            shutil.copytree(checkpoint_dir, kept[-1], dirs_exist_ok=True)

    run_worker(job, WorkerIO(0, 1, report))
    assert [p.name for p in kept] == ["checkpoint_00000002", "checkpoint_00000003"]
    return root / "run"


def test_export_zero3_round_trip(run, tmp_path) -> None:
    from transformers import AutoTokenizer

    out = export(run, tmp_path / "hf")
    assert (out / "model.safetensors").is_file()
    conf = json.loads((out / "config.json").read_text())
    assert conf["torch_dtype"] == "float32" and conf["tie_word_embeddings"] is True
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    infos = [dataset_info(str(run.parent / "ds"))]
    got = exported_eval_loss(out, infos, 1, 4, TrainConfig().eval_batches, pad_id=0)
    assert rows[-1]["step"] == 3 and got == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)

    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    text = tok.apply_chat_template([{"role": "user", "content": "t5 t6"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert text.endswith("<|assistant|>\n") and "<|end|>" in text
    gen = json.loads((out / "generation_config.json").read_text())
    assert sorted(gen["eos_token_id"]) == [1, VOCAB - 1]  # <eos> and <|end|>
    prov = json.loads((out / PROVENANCE_NAME).read_text())
    assert prov["step"] == 3 and prov["seed"] == 0 and prov["train_git_commit"] == "abc"
    assert prov["config_hash"] == "test" and "torch" in prov["export_versions"]


def test_export_bf16_and_truncated_latest_falls_back(run, tmp_path, caplog) -> None:
    from safetensors import safe_open

    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    victim = next((bad / "checkpoint_00000003").rglob("*model_states.pt"))
    victim.write_bytes(victim.read_bytes()[:64])
    with caplog.at_level("WARNING", logger="training.export"):
        ckpt, state = find_checkpoint(bad)
    assert ckpt.name == "checkpoint_00000002" and state.step == 2
    assert "checkpoint_00000003" in caplog.text and "checkpoint_00000002" in caplog.text
    out = export(bad, tmp_path / "hf16", dtype="bf16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert "lm_head.weight" not in names  # tied: stored once
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((out / PROVENANCE_NAME).read_text())["step"] == 2


def test_export_errors_name_the_problem(run, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such run"):
        export(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        export(tmp_path, tmp_path / "o")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a raylm export"):
        export(run, tmp_path / "busy")
    with pytest.raises(ValueError, match="--dtype"):
        export(run, tmp_path / "o", dtype="int8")


def test_cli_export(run, tmp_path, capsys) -> None:
    from cluster.cli import main

    assert main(["export", str(run / "checkpoint_00000002"), "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / PROVENANCE_NAME).read_text())["step"] == 2
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 1
    assert "no such run" in capsys.readouterr().err
    # Above train.export_max_shard_size the weights are sharded; the shards load as one model.
    from transformers import AutoModelForCausalLM

    args = ["export", str(run), "--out", str(tmp_path / "s"), "--set",
            "train.export_max_shard_size=8KB"]  # fmt: skip
    assert main(args) == 0
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    whole = AutoModelForCausalLM.from_pretrained(str(tmp_path / "o"))  # checkpoint 2, unsharded
    sharded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"))  # newest: checkpoint 3
    assert whole.state_dict().keys() == sharded.state_dict().keys()
    assert main([*args[:-1], "train.export_max_shard_size=lots"]) == 1
    assert "train.export_max_shard_size" in capsys.readouterr().err


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_bf16_runs_export_the_fp32_master_weights(stage, tmp_path) -> None:
    """bf16 training keeps fp32 masters in the optimizer (ZeRO-0: per parameter; 1-3:
    partitioned); the export is those, not the bf16 module weights relabelled as fp32: each
    weight rounds to the module's bf16 value, and most carry bits bf16 cannot hold."""
    from safetensors.torch import load_file

    ds = write_synthetic_dataset(tmp_path / "ds", train_rows=16, validation_rows=4, seq_len=SEQ,
                                 vocab_size=VOCAB)  # fmt: skip
    train = TrainConfig(global_batch_tokens=SEQ * 8, micro_batch_size=4, log_every=1, lr=3e-3,
                        warmup_steps=0, checkpoint_every=2, max_steps=2)  # fmt: skip
    job = WorkerJob(model=ModelConfig(), train=train,
                    deepspeed=DeepSpeedConfig(zero_stage=stage, precision="bf16"), seed=0,
                    run_dir=str(tmp_path / "run"), datasets=[dataset_info(str(ds))],
                    weights=[1.0], seq_len=SEQ, vocab_size=VOCAB, pad_id=0, total_steps=2,
                    config_hash="test")  # fmt: skip

    def report(metrics, checkpoint_dir, step, dir_name=None):
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, tmp_path / "run" / dir_name, dirs_exist_ok=True)

    run_worker(job, WorkerIO(0, 1, report))
    out = export(tmp_path / "run", tmp_path / "hf")
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert (q != q.to(torch.bfloat16).float()).float().mean() > 0.9  # fp32 bits: a master copy
    tag = (tmp_path / "run" / "checkpoint_00000002" / "latest").read_text().strip()
    states = list((tmp_path / "run" / "checkpoint_00000002" / tag).glob("*model_states.pt"))
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    if stage < 3:  # ZeRO-3's module file holds no weights, only placeholders
        for name, w in weights.items():
            torch.testing.assert_close(w.to(torch.bfloat16), module[name], atol=0, rtol=0)
