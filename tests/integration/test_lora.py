"""LoRA fine-tuning (2 ranks, ZeRO-2) and `raylm export`.

One module-scoped run of the loop on the session's packed SFT data, starting from the session's
pretrained export (forked ranks: the loop is what trains the adapters, Ray Train only runs it); the
export, resume and bad-input tests share it. The resume goes through Ray Train: a copy of that run
dir, which Ray has no record of, resumes from its adapter checkpoint with more steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from tests.mp_loop import run_loop
from training.errors import TrainConfigError
from training.export import consolidated_state_dict, export, find_checkpoint
from training.launcher import plan_job, run_dir, train
from training.records import read_events

pytestmark = pytest.mark.timeout(600)
TARGETS = ["q_proj", "v_proj", "up_proj"]


def _cfg(prepared_sft, base: Path, storage: Path, *overrides: str):
    return load_config(None, [
        "name=lora",
        "train.task=sft",
        f"train.datasets=[{prepared_sft.output}]",
        f"train.storage_path={storage}",
        f"model.init_from={base}",
        "train.lora.enabled=true",
        "train.lora.rank=4",
        f"train.lora.target_modules=[{','.join(TARGETS)}]",
        "train.lora.modules_to_save=[embed_tokens]",  # tied: the output head trains with it
        "train.global_batch_tokens=1024",  # 8 rows of 128
        "train.micro_batch_size=2",
        "train.max_steps=4",
        "train.lr=0.01",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_batches=1",
        "scaling.num_workers=2",
        "deepspeed.zero_stage=2",
        *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(ray_local, prepared_sft, pretrained_model_dir, tmp_path_factory):
    cfg = _cfg(prepared_sft, pretrained_model_dir, tmp_path_factory.mktemp("lora_runs"))
    run_loop(plan_job(cfg), world=cfg.scaling.num_workers)
    return cfg


@pytest.fixture(scope="module")
def exports(lora_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_exports")
    return {
        "merged": export(run_dir(lora_run), root / "merged"),
        "adapter": export(run_dir(lora_run), root / "adapter", adapter_only=True),
    }


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_checkpoint_holds_only_adapter_weights(lora_run) -> None:
    ckpt, _ = find_checkpoint(run_dir(lora_run))
    names = list(consolidated_state_dict(ckpt))
    adapters = [n for n in names if "lora_" in n]
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapters} == set(TARGETS)
    saved = [n for n in names if "lora_" not in n]
    assert saved and all("embed_tokens.modules_to_save" in n or "lm_head.modules_to_save" in n
                         for n in saved), saved  # fmt: skip


def test_merged_export_equals_base_plus_adapter(exports, pretrained_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.arange(3, 40).reshape(1, -1)
    base = AutoModelForCausalLM.from_pretrained(pretrained_model_dir).eval()
    base_logits = _logits(base, ids)
    with_adapter = PeftModel.from_pretrained(base, exports["adapter"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(exports["merged"]).eval()
    expected = _logits(with_adapter, ids)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-5)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter trained: not a no-op


def test_base_weights_unchanged_outside_adapted_modules(exports, pretrained_model_dir) -> None:
    from safetensors.torch import load_file

    base = load_file(str(pretrained_model_dir / "model.safetensors"))
    merged = load_file(str(exports["merged"] / "model.safetensors"))
    assert base.keys() == merged.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed, "merging a trained adapter must change its target modules"
    assert all(k.split(".")[-2] in TARGETS + ["embed_tokens"] for k in changed), sorted(changed)
    adapter = load_file(str(exports["adapter"] / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k or "embed_tokens" in k or "lm_head" in k for k in adapter)
    prov = json.loads((exports["adapter"] / "provenance.json").read_text())
    assert prov["adapter_only"] is True and prov["lora_base"] == str(pretrained_model_dir)


def test_rerun_with_more_steps_resumes_from_adapter_checkpoint(
    lora_run, prepared_sft, pretrained_model_dir, tmp_path
) -> None:
    storage = tmp_path / "runs"
    shutil.copytree(run_dir(lora_run), storage / "lora")
    cfg = _cfg(prepared_sft, pretrained_model_dir, storage, "train.max_steps=6")
    train(cfg)
    resumes = [e for e in read_events(run_dir(cfg)) if e["event"] == "resume"]
    assert resumes and resumes[-1]["step"] == 4 and "finished" not in resumes[-1]
    state = find_checkpoint(run_dir(cfg))[1]
    assert state.step == 6


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lora.target_modules=[q_proj,qkv_proj]", "train.lora.target_modules: ['qkv_proj']"),
        (
            "model.init_from=/nonexistent/model",
            "model.init_from: /nonexistent/model does not exist",
        ),
    ],
)
def test_bad_lora_config_fails_before_workers(
    prepared_sft, pretrained_model_dir, tmp_path, override, message
) -> None:
    with pytest.raises(TrainConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_job(_cfg(prepared_sft, pretrained_model_dir, tmp_path, override))


def test_base_dir_without_weights_or_lora_without_base_is_refused(
    prepared_sft, pretrained_model_dir, tmp_path
) -> None:
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(pretrained_model_dir / "config.json", no_weights / "config.json")
    with pytest.raises(TrainConfigError, match="has no model.safetensors"):
        plan_job(_cfg(prepared_sft, no_weights, tmp_path))
    with pytest.raises(TrainConfigError, match="train.lora.enabled: .*set model.init_from"):
        plan_job(_cfg(prepared_sft, pretrained_model_dir, tmp_path, "model.init_from="))
