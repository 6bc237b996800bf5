"""Full fine-tuning: ZeRO-3 loads `model.init_from` straight into partitions, and packed SFT rows
give the same loss as the same conversations unpacked.

The ZeRO-3 run is raylm's loop on 2 local ranks (``tests.mp_loop``) x 2 steps of SFT from the
session's pretrained export.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cluster.config import load_config
from tests.conftest import prepare_data
from tests.mp_loop import run_loop
from training.batch import forward_packed, loss_targets, token_loss
from training.export import export
from training.launcher import plan_job, run_dir

pytestmark = pytest.mark.timeout(600)


def test_zero3_sft_from_export_loads_partitioned_and_exports(
    prepared_sft, pretrained_model_dir, tmp_path
) -> None:
    from safetensors.torch import load_file

    cfg = load_config(None, [
        "name=sft-zero3",
        "train.task=sft",
        f"train.datasets=[{prepared_sft.output}]",
        f"train.storage_path={tmp_path / 'runs'}",
        f"model.init_from={pretrained_model_dir}",
        "train.global_batch_tokens=1024",
        "train.micro_batch_size=2",
        "train.max_steps=2",
        "train.log_every=1",
        "scaling.num_workers=2",
        "deepspeed.zero_stage=3",
    ])  # fmt: skip
    run_loop(plan_job(cfg), world=2)
    total = sum(
        t.numel() for t in load_file(str(pretrained_model_dir / "model.safetensors")).values()
    )
    for rank in (0, 1):
        info = json.loads((run_dir(cfg) / "workers" / f"rank_{rank}.json").read_text())
        assert info["total_params"] == total
        # Each rank holds its half right after loading (padding: a few elements per parameter).
        assert total / 2 <= info["local_params"] <= total / 2 + 64
    out = export(run_dir(cfg), tmp_path / "export")
    tuned = load_file(str(out / "model.safetensors"))
    base = load_file(str(pretrained_model_dir / "model.safetensors"))
    assert tuned.keys() == base.keys()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # it trained


def _loss(model, path, pad_id: int) -> tuple[float, int]:
    """Summed token loss and count over every row of a prepared split (fp32)."""
    table = pq.read_table(sorted(path.glob("*.parquet"))).to_pydict()
    total, count = 0.0, 0
    for start in range(0, len(table["input_ids"]), 8):
        t = {k: torch.tensor(np.array(table[k][start : start + 8]), dtype=torch.long)
             for k in ("input_ids", "position_ids", "labels")}  # fmt: skip
        targets = loss_targets(t["input_ids"], t["position_ids"], pad_id, t["labels"])
        with torch.no_grad():
            logits = forward_packed(model, t["input_ids"], t["position_ids"])
        s, c = token_loss(logits, targets)
        total, count = total + float(s), count + int(c)
    return total, count


def test_packed_and_unpacked_sft_give_the_same_loss(
    prepared_sft, pretrained_model_dir, tokenizer_dir, synth_corpus, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    unpacked = prepare_data(
        tokenizer_dir, inputs=[str(synth_corpus / "sft" / "train")], output=str(tmp_path / "u"),
        mode="sft", seq_len=128, validation_fraction=0.1, sft={"pack": False},
    )  # fmt: skip
    packed_rows = prepared_sft.manifest["splits"]["validation"]["rows"]
    assert unpacked.manifest["splits"]["validation"]["rows"] > packed_rows  # really packed
    model = AutoModelForCausalLM.from_pretrained(pretrained_model_dir).eval()
    pad = int(prepared_sft.manifest["pad_token_id"])
    p_total, p_count = _loss(model, prepared_sft.output / "validation", pad)
    u_total, u_count = _loss(model, unpacked.output / "validation", pad)
    assert p_count == u_count > 0
    assert p_total == pytest.approx(u_total, rel=1e-5)
