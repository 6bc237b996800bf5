"""Training config sections and the DeepSpeed dict builder (pure, no Ray)."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, load_config
from training.config import TrainConfig
from training.ds_config import batch_plan, build_ds_config, deep_merge
from training.errors import TrainConfigError


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage"),
        ("train.keep_checkpoints=1", "train.keep_checkpoints"),
        ("train.nonfinite=ignore", "train.nonfinite"),
        ("model.preset=7b", "model.preset"),
        ("scaling.placement_strategy=ANY", "scaling.placement_strategy"),
        ("train.bogus=1", "train.bogus"),
    ],
)
def test_bad_training_keys_name_the_dotted_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["model.hidden_size=65"], "num_heads"),
        (["model.num_kv_heads=3"], "num_kv_heads"),
        (["deepspeed.offload_params=true", "deepspeed.zero_stage=2"], "offload_params"),
        (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], "offload_optimizer"),
        (["train.min_lr=1", "train.lr=0.1"], "min_lr"),
    ],
)
def test_cross_field_errors(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)


def test_dataset_strings_become_weighted_entries() -> None:
    cfg = load_config(None, ["train.datasets=[a, {path: b, weight: 3}]"])
    assert [(d.path, d.weight) for d in cfg.train.datasets] == [("a", 1.0), ("b", 3.0)]


def test_preset_overrides() -> None:
    cfg = load_config(None, ["model.preset=125m", "model.num_layers=3"])
    shape = cfg.model.shape()
    assert shape["num_layers"] == 3 and shape["hidden_size"] == 768


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_num_workers_does_not_change_rows_per_step(workers: int) -> None:
    plan = batch_plan(
        global_batch_tokens=64 * 32, seq_len=64, micro_batch_size=2, world_size=workers
    )
    assert plan.global_rows == 32
    assert plan.grad_accum * plan.micro_batch * workers == 32


def test_batch_plan_errors_name_keys() -> None:
    with pytest.raises(TrainConfigError, match=r"train\.global_batch_tokens .*seq_len"):
        batch_plan(1000, 64, 1, 1)
    with pytest.raises(TrainConfigError, match=r"scaling\.num_workers \(3\)"):
        batch_plan(64 * 8, 64, 2, 3)


def _train(**kw) -> TrainConfig:
    return TrainConfig(global_batch_tokens=64 * 16, micro_batch_size=2, **kw)


def test_ds_config_dict() -> None:
    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.offload_params=true",
                             "deepspeed.offload_optimizer=true"])  # fmt: skip
    ds = build_ds_config(_train(grad_clip=0.5, warmup_steps=3, lr=1e-3, min_lr=1e-4),
                         cfg.deepspeed, seq_len=64, world_size=2, total_steps=50)  # fmt: skip
    assert ds["train_batch_size"] == 16
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW"
    assert "torch_adam" not in ds["optimizer"]["params"]  # offload uses DeepSpeed's CPU Adam
    sched = ds["scheduler"]["params"]
    assert sched["total_num_steps"] == 50 and sched["warmup_num_steps"] == 3
    assert sched["cos_min_ratio"] == pytest.approx(0.1)
    assert "bf16" not in ds and "fp16" not in ds


def test_precision_and_extra_merge_last() -> None:
    cfg = load_config(None, ["deepspeed.precision=bf16", "deepspeed.zero_stage=1"])
    cfg.deepspeed.extra = {
        "zero_optimization": {"reduce_bucket_size": 123},
        "bf16": {"enabled": False},
    }
    ds = build_ds_config(_train(), cfg.deepspeed, seq_len=64, world_size=1, total_steps=10)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 123}
    assert ds["bf16"] == {"enabled": False, "check_grad_overflow": True}
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_fp16_without_cuda_is_refused() -> None:
    cfg = load_config(None, ["deepspeed.precision=fp16"])
    with pytest.raises(TrainConfigError, match=r"deepspeed\.precision: fp16 needs CUDA"):
        build_ds_config(_train(), cfg.deepspeed, seq_len=64, world_size=1, total_steps=10)
    ds = build_ds_config(_train(), cfg.deepspeed, seq_len=64, world_size=1, total_steps=10,
                         use_gpu=True, cuda_available=True)  # fmt: skip
    assert ds["fp16"]["enabled"] is True


def test_deep_merge_does_not_mutate() -> None:
    base = {"a": {"b": 1}}
    out = deep_merge(base, {"a": {"c": 2}})
    assert out == {"a": {"b": 1, "c": 2}} and base == {"a": {"b": 1}}
