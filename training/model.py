"""Model factory: a Llama-style ``LlamaForCausalLM`` from a preset, or loaded from a local HF dir.

Knows nothing of distribution: no ``ray``, no ``deepspeed``. Under ZeRO-3 the caller wraps
:func:`build_model` in ``deepspeed.zero.Init`` (see ``training.engine``), which partitions each
parameter as the module constructor creates it.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from training.config import ModelConfig

__all__ = [
    "build_model",
    "flops_per_token",
    "hf_config",
    "init_parameter",
    "init_weights",
    "load_hf_config",
    "model_max_positions",
]


def load_hf_config(path: str | Path) -> LlamaConfig:
    """Read ``config.json`` of a local HF dir, refusing anything that is not a Llama model."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model.init_from: {path} has no config.json")
    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    if raw.get("model_type") != "llama":
        raise ValueError(f"model.init_from: {path} is a {raw.get('model_type')!r} model, not llama")
    return LlamaConfig.from_pretrained(str(path))


def hf_config(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype = torch.float32) -> LlamaConfig:
    """The transformers config for ``cfg`` (``init_from`` dir wins over the shape keys)."""
    if cfg.init_from:
        conf = load_hf_config(cfg.init_from)
    else:
        s = cfg.shape()
        conf = LlamaConfig(
            vocab_size=cfg.vocab_size or vocab_size,
            hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"],
            num_hidden_layers=s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_kv_heads"],
            max_position_embeddings=s["max_position_embeddings"],
            tie_word_embeddings=cfg.tie_word_embeddings,
            rope_theta=cfg.rope_theta,
            initializer_range=cfg.init_std,
            attention_bias=False,
            mlp_bias=False,
        )
    conf._attn_implementation = cfg.attn_implementation
    conf.dtype = dtype
    # No KV cache in training; it would only hold memory.
    conf.use_cache = False
    return conf


def model_max_positions(cfg: ModelConfig) -> int:
    """Longest sequence the configured model accepts (for the seq_len preflight check)."""
    if cfg.init_from:
        return int(load_hf_config(cfg.init_from).max_position_embeddings)
    return cfg.shape()["max_position_embeddings"]


def init_parameter(name: str, param: torch.Tensor, seed: int, std: float) -> None:
    """Initialise one full (gathered) parameter from (seed, name) alone.

    Independent of construction order and of the other parameters, so a model built whole, or
    parameter by parameter from ZeRO-3 partitions, gets identical weights. Llama's scheme:
    matrices and embeddings ~ N(0, std), RMSNorm weights 1.
    """
    with torch.no_grad():
        if param.dim() < 2:
            param.fill_(1.0)
            return
        gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(name.encode()) ^ (seed << 32))
        param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """``init_parameter`` for every parameter (tied ones once)."""
    for name, param in model.named_parameters():
        init_parameter(name, param, seed, std)


def build_model(
    cfg: ModelConfig,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
    seed: int | None = 0,
) -> LlamaForCausalLM:
    """Construct the model on the current device/context.

    From scratch, weights come from :func:`init_weights` with ``seed`` (``None`` skips it: the
    caller initialises, e.g. per gathered ZeRO-3 partition). ``init_from`` loads safetensors
    weights only (no pickle); a missing ``model.safetensors`` is an error, never a random init.
    """
    conf = hf_config(cfg, vocab_size, dtype)
    if cfg.init_from:
        model = LlamaForCausalLM.from_pretrained(
            cfg.init_from,
            config=conf,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
        )
    else:
        model = LlamaForCausalLM(conf)
        if seed is not None:
            init_weights(model, seed, cfg.init_std)
        model = model.to(dtype)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def flops_per_token(conf: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + attention scores (PaLM appendix B).

    Forward matmul FLOPs per token are 2 x (non-embedding params + lm_head); attention adds
    2 x 2 x layers x seq x hidden (QK^T and AV, full causal square as PaLM counts it).
    Backward is twice forward, hence the factor 3 over forward.
    """
    h, n_layers = conf.hidden_size, conf.num_hidden_layers
    head_dim = h // conf.num_attention_heads
    kv = conf.num_key_value_heads * head_dim
    attn_params = h * h * 2 + h * kv * 2  # q, o: h x h; k, v: h x kv
    mlp_params = 3 * h * conf.intermediate_size  # gate, up, down
    matmul_params = n_layers * (attn_params + mlp_params) + h * conf.vocab_size  # + lm_head
    attention = 2 * 2 * n_layers * seq_len * h
    return 3.0 * (2.0 * matmul_params + attention)
