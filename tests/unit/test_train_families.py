"""Model families without Ray: loading rules, packing, from-scratch init, counts, LoRA targets.

Every family is a tiny random config built by transformers (tests/families.py), fp32 on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.families import FAMILIES, SLIDING, save_tiny_model, tiny_config
from training.batch import forward_packed
from training.config import LoraConfig, ModelConfig
from training.errors import TrainConfigError
from training.lora import apply_lora, embedding_modules, lora_param_counts
from training.model import (
    build_model,
    flops_per_token,
    load_hf_config,
    meta_model,
    model_stats,
    packing_problem,
)


def _docs(vocab: int, lengths=(7, 12, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("family", FAMILIES)
def test_document_logits_inside_packed_row_equal_alone(family: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, 97)).eval()
    docs = _docs(97)
    row = torch.cat(docs)[None]  # (1, 24)
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = forward_packed(model, row, pos)
        start = 0
        for d in docs:
            alone = model(input_ids=d[None], use_cache=False).logits
            torch.testing.assert_close(
                packed[:, start : start + len(d)], alone, rtol=1e-5, atol=1e-5
            )
            start += len(d)
        # Control: one causal document over the row lets the 2nd document see the 1st.
        leaky = forward_packed(model, row, torch.arange(24)[None])
    assert not torch.allclose(leaky[:, 7:19], packed[:, 7:19], atol=1e-4)


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_is_kept_in_packed_rows(family: str) -> None:
    """A 12-token document with a 4-token window: its logits differ from full attention's, so
    the packed forward (which equals the document alone, above) kept the window."""
    torch.manual_seed(0)
    conf = tiny_config(family, 97)
    model = AutoModelForCausalLM.from_config(conf).eval()
    full = tiny_config(family, 97)
    full.sliding_window = 1024  # longer than the document: the same layers, no effective window
    wide = AutoModelForCausalLM.from_config(full).eval()
    wide.load_state_dict(model.state_dict())
    doc = _docs(97, (12,))[0]
    pos = torch.arange(12)[None]
    with torch.no_grad():
        windowed = forward_packed(model, doc[None], pos)
        unwindowed = forward_packed(wide, doc[None], pos)
    torch.testing.assert_close(windowed[:, :4], unwindowed[:, :4], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(windowed[:, 8:], unwindowed[:, 8:], atol=1e-4)


def _write_config(tmp_path: Path, name: str, raw: dict) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    return d


def test_encoders_seq2seq_and_remote_code_are_refused_naming_why(tmp_path) -> None:
    bert = _write_config(tmp_path, "bert", {"model_type": "bert"})
    with pytest.raises(TrainConfigError, match="'bert' is an encoder"):
        load_hf_config(bert)
    t5 = _write_config(tmp_path, "t5", {"model_type": "t5", "is_encoder_decoder": True})
    with pytest.raises(TrainConfigError, match="'t5' is an encoder-decoder"):
        load_hf_config(t5)
    custom = _write_config(tmp_path, "custom", {
        "model_type": "my_lm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyLM"}})  # fmt: skip
    with pytest.raises(TrainConfigError, match="model.trust_remote_code: true"):
        load_hf_config(custom)
    unknown = _write_config(tmp_path, "unknown", {"model_type": "my_lm"})
    with pytest.raises(TrainConfigError, match="unknown to transformers"):
        load_hf_config(unknown)


def test_untested_family_loads_with_a_warning(tmp_path, caplog) -> None:
    from transformers import CONFIG_MAPPING

    out = tmp_path / "olmo"
    conf = CONFIG_MAPPING["olmo"](vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=1, num_attention_heads=2)  # fmt: skip
    AutoModelForCausalLM.from_config(conf).save_pretrained(str(out))
    with caplog.at_level("WARNING"):
        model = build_model(ModelConfig(init_from=str(out)), vocab_size=64)
    assert type(model).__name__ == "OlmoForCausalLM"
    assert "'olmo' models are not among raylm's tested families" in caplog.text


def test_recurrent_families_cannot_pack() -> None:
    from transformers import CONFIG_MAPPING

    assert packing_problem(tiny_config("gemma2", 97)) is None
    assert "position_ids" in packing_problem(CONFIG_MAPPING["mamba"]())
    assert "position_ids" in packing_problem(CONFIG_MAPPING["jamba"]())  # attention + mamba layers


@pytest.mark.parametrize("family", FAMILIES)
def test_param_counts_and_flops_read_the_real_architecture(family: str) -> None:
    conf = tiny_config(family, 97)
    model = AutoModelForCausalLM.from_config(conf)
    stats = model_stats(conf)
    assert stats.total_params == sum(p.numel() for p in model.parameters())
    heads = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // heads
    assert stats.attention_width == heads * head_dim
    # matmul weights: every Linear/Conv1D weight once, the (tied or untied) output head included
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")  # fmt: skip
    assert stats.matmul_params == linear
    assert flops_per_token(conf, 64) == 3 * (
        2 * linear + 4 * conf.num_hidden_layers * 64 * heads * head_dim
    )
    total, trainable = lora_param_counts(meta_model(conf), LoraConfig(rank=4))
    peft_model = apply_lora(AutoModelForCausalLM.from_config(conf), LoraConfig(rank=4), False)
    assert total == sum(p.numel() for p in peft_model.parameters())
    assert trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0


def test_all_linear_lora_covers_fused_and_conv1d_projections() -> None:
    phi = apply_lora(AutoModelForCausalLM.from_config(tiny_config("phi3", 97)), LoraConfig(), False)
    adapted = {n.split(".")[-4] for n, _ in phi.named_parameters() if "lora_A" in n}
    assert adapted == {"qkv_proj", "gate_up_proj", "o_proj", "down_proj"}
    gpt2 = AutoModelForCausalLM.from_config(tiny_config("gpt2", 97)).eval()
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        before = gpt2(input_ids=ids).logits
    wrapped = apply_lora(gpt2, LoraConfig(), False)
    targets = {n.split(".")[-4] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert targets == {"c_attn", "c_proj", "c_fc"}  # Conv1D layers; the head is left alone
    with torch.no_grad():
        after = wrapped(input_ids=ids).logits  # B starts at 0: the adapter adds nothing yet
    torch.testing.assert_close(after, before)


def test_embedding_modules_are_asked_of_the_model() -> None:
    assert embedding_modules(meta_model(tiny_config("gpt2", 97))) == ("wte", None)
    assert embedding_modules(meta_model(tiny_config("llama", 97))) == ("embed_tokens", "lm_head")
    assert embedding_modules(meta_model(tiny_config("qwen3", 97))) == ("embed_tokens", None)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gpt2"])
def test_from_scratch_architectures_init_by_module_type(arch: str) -> None:
    cfg = ModelConfig(architecture=arch)
    model = build_model(cfg, vocab_size=97, seed=3)
    assert model.config.model_type == arch
    again = build_model(cfg, vocab_size=97, seed=3)
    reference = AutoModelForCausalLM.from_config(model.config)  # transformers' own init
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(again.named_parameters())[name])  # deterministic
        if p.dim() >= 2:
            assert abs(float(p.detach().std()) - cfg.init_std) < 0.3 * cfg.init_std, name
        elif name.endswith("bias"):
            assert not p.any(), name
        else:  # norm weights: the family's own convention
            torch.testing.assert_close(p, ref[name], msg=name)
    other = build_model(cfg, vocab_size=97, seed=4)
    assert not torch.equal(next(other.parameters()), next(model.parameters()))


def test_gpt2_refuses_grouped_query_shapes() -> None:
    with pytest.raises(TrainConfigError, match="model.num_kv_heads: gpt2"):
        build_model(ModelConfig(architecture="gpt2", preset="1b"), vocab_size=97)


def test_sharded_safetensors_base_loads(tmp_path) -> None:
    out = save_tiny_model("qwen2", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    loaded = build_model(ModelConfig(init_from=str(tmp_path / "sharded")), vocab_size=97)
    for (n, a), b in zip(model.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)
