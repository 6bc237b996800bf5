"""Tiny random configs of the causal-LM families raylm tests, built by transformers (no downloads).

Each keeps what makes its family different: Mistral's sliding window, Qwen2's qkv bias, Qwen3's
q/k norms and explicit head_dim, Gemma 2's soft-capping, (1 + w) norms and alternating sliding
layers, Phi-3's fused qkv_proj / gate_up_proj, GPT-2's Conv1D, learned positions and wte. Windows
are shorter than the test documents so that a dropped window would show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["FAMILIES", "SLIDING", "save_tiny_model", "tiny_config"]

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2")
SLIDING = ("mistral", "gemma2", "gemma3_text", "qwen2")  # families whose test config has a window
WINDOW = 4

_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
_EXTRA: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False),
    "mistral": dict(sliding_window=WINDOW, head_dim=8),
    # qkv bias is built in; one sliding layer over two (max_window_layers) exercises layer_types.
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(head_dim=16, tie_word_embeddings=True),  # head_dim != hidden / heads
    "gemma2": dict(
        head_dim=8,
        sliding_window=WINDOW,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        query_pre_attn_scalar=8,
    ),  # fmt: skip
    "gemma3_text": dict(
        head_dim=8, sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=8
    ),  # fmt: skip
    "phi3": dict(num_key_value_heads=4, tie_word_embeddings=False),
}


def tiny_config(family: str, vocab_size: int, **token_ids: int) -> Any:
    """A two-layer config of ``family`` with ``vocab_size`` tokens and the given bos/eos/pad ids."""
    from transformers import CONFIG_MAPPING

    if family == "gpt2":
        kwargs: dict[str, Any] = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=256,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    else:
        kwargs = {**_DECODER, **_EXTRA.get(family, {})}
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **token_ids}
    return CONFIG_MAPPING[family](vocab_size=vocab_size, initializer_range=0.2, **kwargs, **ids)


def save_tiny_model(
    family: str, out: Path, tokenizer: Any = None, seed: int = 0, **ids: int
) -> Path:
    """A random-init model of ``family`` saved as a HF dir (safetensors), with ``tokenizer``'s
    files and ids when one is given (vocabulary: the tokenizer's length, else 97)."""
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id, **ids}  # fmt: skip
    torch.manual_seed(seed)
    conf = tiny_config(family, len(tokenizer) if tokenizer is not None else 97, **ids)
    model = AutoModelForCausalLM.from_config(conf).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
