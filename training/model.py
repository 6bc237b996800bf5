"""Model factory: any transformers causal LM, from a size preset or loaded from a local HF dir.

Knows nothing of distribution: no ``ray``, no ``deepspeed``. Under ZeRO-3 the caller wraps
:func:`build_model` in ``deepspeed.zero.Init`` (see ``training.loop``), which partitions each
parameter as the module constructor creates it.

Family details (norm conventions, tied heads, fused projections, positions) come from the
transformers config and model classes, not from a list of names: a local dir loads if
``AutoModelForCausalLM`` maps its ``config.json``; the families raylm tests are
:data:`TESTED_FAMILIES`, others load with a warning.
"""

from __future__ import annotations

import inspect
import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.config import ModelConfig
from training.errors import TrainConfigError

__all__ = [
    "TESTED_FAMILIES",
    "ModelStats",
    "build_model",
    "causal_lm_class",
    "flops_per_token",
    "hf_config",
    "init_parameter",
    "init_weights",
    "load_hf_config",
    "meta_model",
    "model_max_positions",
    "model_stats",
    "packing_problem",
    "resize_vocab",
]

log = logging.getLogger(__name__)

# Families with a tiny random model in the test suite (train -> export -> serve). Others load if
# transformers loads them, with a warning.
TESTED_FAMILIES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2"}
)
# Attention layer kinds that respect per-document position_ids in packed rows.
_ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


def _read_config_json(path: str | Path) -> dict[str, Any]:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise TrainConfigError(f"model.init_from: {path} has no config.json (not a HF model dir)")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TrainConfigError(f"model.init_from: {cfg_path}: not valid JSON ({exc})") from None


def _check_causal_lm(raw: dict[str, Any], path: str | Path, trust_remote_code: bool) -> bool:
    """Refuse what raylm cannot train as a decoder-only causal LM; True if remote code is needed."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mtype = raw.get("model_type")
    where = f"model.init_from: {path}"
    remote = "AutoModelForCausalLM" in (raw.get("auto_map") or {})
    if mtype not in CONFIG_MAPPING:
        if not remote:
            raise TrainConfigError(f"{where}: model_type {mtype!r} is unknown to transformers "
                                   "and the dir ships no AutoModelForCausalLM code")  # fmt: skip
        if not trust_remote_code:
            raise TrainConfigError(f"{where}: model_type {mtype!r} needs the model code shipped in "
                                   "the dir; set model.trust_remote_code: true if you trust it")  # fmt: skip
        return True
    if raw.get("is_encoder_decoder"):
        raise TrainConfigError(f"{where}: {mtype!r} is an encoder-decoder (seq2seq) model; raylm "
                               "trains decoder-only causal LMs")  # fmt: skip
    if mtype in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not raw.get("is_decoder"):
        raise TrainConfigError(f"{where}: {mtype!r} is an encoder (bidirectional attention, "
                               "masked-LM pretraining); raylm trains decoder-only causal LMs")  # fmt: skip
    if mtype not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise TrainConfigError(f"{where}: transformers has no causal-LM class for {mtype!r}")
    return False


def load_hf_config(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The transformers config of a local causal-LM dir; refuses encoders and seq2seq models, and
    code shipped with the model unless ``trust_remote_code``."""
    from transformers import AutoConfig

    raw = _read_config_json(path)
    remote = _check_causal_lm(raw, path, trust_remote_code)
    conf = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=remote)
    return conf


def causal_lm_class(conf: Any) -> Any:
    """The ``AutoModelForCausalLM`` class for a config (remote code included when it maps one)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(conf) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(conf)]
    return AutoModelForCausalLM  # remote code: resolved by from_pretrained / from_config


def _scratch_config(cfg: ModelConfig, vocab_size: int) -> Any:
    """A from-scratch config of ``cfg.architecture`` with the preset's shape mapped onto it."""
    from transformers import CONFIG_MAPPING

    s = cfg.shape()
    common = dict(vocab_size=cfg.vocab_size or vocab_size,
                  tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.init_std)  # fmt: skip
    if cfg.architecture == "gpt2":
        if s["num_kv_heads"] != s["num_heads"]:
            raise TrainConfigError(f"model.num_kv_heads: gpt2 has no grouped-query attention; "
                                   f"set it to num_heads ({s['num_heads']})")  # fmt: skip
        # No dropout, as the other presets: regularisation is the user's choice.
        return CONFIG_MAPPING["gpt2"](
            n_embd=s["hidden_size"], n_layer=s["num_layers"], n_head=s["num_heads"],
            n_inner=s["intermediate_size"], n_positions=s["max_position_embeddings"],
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )  # fmt: skip
    kwargs = dict(
        hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["num_layers"], num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_kv_heads"], max_position_embeddings=s["max_position_embeddings"],
        rope_theta=cfg.rope_theta, **common,
    )  # fmt: skip
    if cfg.architecture in ("qwen3", "mistral"):
        kwargs["head_dim"] = s["hidden_size"] // s["num_heads"]
    if cfg.architecture == "mistral":
        kwargs["sliding_window"] = None  # full attention, as the other presets
    return CONFIG_MAPPING[cfg.architecture](**kwargs)


def hf_config(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers config for ``cfg`` (an ``init_from`` dir wins over the shape keys)."""
    if cfg.init_from:
        conf = load_hf_config(cfg.init_from, cfg.trust_remote_code)
    else:
        conf = _scratch_config(cfg, vocab_size)
    if cfg.attn_implementation != "auto":
        conf._attn_implementation = cfg.attn_implementation
    conf.dtype = dtype
    # No KV cache in training; it would only hold memory.
    conf.use_cache = False
    return conf


def model_max_positions(cfg: ModelConfig) -> int | None:
    """Longest sequence the configured model accepts (None: no limit in its config)."""
    conf = hf_config(cfg, vocab_size=8)
    value = getattr(conf, "max_position_embeddings", None)
    return int(value) if value else None


def packing_problem(conf: Any) -> str | None:
    """Why packed rows (documents separated by position_ids restarts) would leak between
    documents in this model, or None when its attention keeps them apart.

    transformers builds per-document masks (full or sliding window) from position_ids when no
    attention mask is given; recurrent or linear-attention layers carry state across the whole
    row regardless, so packing such a family would train across document boundaries.
    """
    kinds = set(getattr(conf, "layer_types", None) or [])
    kinds |= set(getattr(conf, "layers_block_type", None) or [])
    other = sorted(kinds - _ATTENTION_LAYERS)
    if other:
        return f"its layers include {other}, which ignore per-document position_ids"
    cls = causal_lm_class(conf)
    forward = getattr(cls, "forward", None)
    if forward is not None and "position_ids" not in inspect.signature(forward).parameters:
        return f"{cls.__name__} takes no position_ids, so documents in a row cannot be separated"
    return None


def init_parameter(name: str, param: torch.Tensor, seed: int, std: float) -> None:
    """Initialise one full (gathered) parameter from (seed, name) alone.

    Independent of construction order and of the other parameters, so a model built whole, or
    parameter by parameter from ZeRO-3 partitions, gets identical weights. By kind: matrices
    (linear, Conv1D, embeddings, positions) ~ N(0, std); biases 0; other 1-D parameters (norm
    weights) keep what the family's constructor gave them (1 for RMSNorm/LayerNorm, 0 for
    Gemma's (1 + w) norms).
    """
    with torch.no_grad():
        if param.dim() >= 2:
            # The CPU generator keeps only 32 bits of its seed: hash seed and name together.
            gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
        elif name.endswith("bias"):
            param.zero_()


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
) -> Any:
    """Construct the model on the current device/context.

    From scratch, weights come from :func:`init_weights` with ``seed`` (``None`` skips it: the
    caller initialises, e.g. per gathered ZeRO-3 partition). ``init_from`` loads safetensors
    weights only (no pickle); missing weights are an error, never a random init.
    """
    conf = hf_config(cfg, vocab_size, dtype)
    if cfg.init_from:
        mtype = getattr(conf, "model_type", "?")
        if mtype not in TESTED_FAMILIES:
            log.warning("model.init_from: %r models are not among raylm's tested families (%s); "
                        "loading it as transformers does", mtype, ", ".join(sorted(TESTED_FAMILIES)))  # fmt: skip
        model = causal_lm_class(conf).from_pretrained(
            cfg.init_from, config=conf, dtype=dtype, use_safetensors=True, local_files_only=True,
            trust_remote_code=cfg.trust_remote_code,
        )  # fmt: skip
    else:
        model = causal_lm_class(conf)(conf)
        if seed is not None:
            init_weights(model, seed, cfg.init_std)
        model = model.to(dtype)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def resize_vocab(model: Any, vocab_size: int, seed: int) -> None:
    """Grow the embeddings (and an untied head) of a loaded base to ``vocab_size`` rows.

    For a dataset tokenizer that outgrew the base (e.g. the default chat template's tokens); the
    config's vocab_size follows. New rows are drawn around the old rows' mean (mean_resizing)
    from ``seed``, so every rank, and a DPO reference built apart from the workers, adds the same
    rows. A model already that large is left alone.
    """
    if vocab_size <= model.config.vocab_size:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(vocab_size, mean_resizing=True)


def meta_model(conf: Any) -> torch.nn.Module:
    """The model of ``conf`` on the meta device: names, shapes and module types, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        cls = causal_lm_class(conf)
        if cls is AutoModelForCausalLM:
            return AutoModelForCausalLM.from_config(conf, trust_remote_code=True)
        return cls(conf)


@dataclass(frozen=True)
class ModelStats:
    """Counts read off a meta-device instance of the real config."""

    total_params: int  # unique parameters (a tied head counted once)
    matmul_params: int  # weights of per-token matmuls (linear/Conv1D, the output head), MoE active
    attention_width: int  # num_heads x head_dim: width of QK^T and AV
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int


def _is_matmul(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def model_stats(conf: Any) -> ModelStats:
    """Parameter counts of the actual architecture (biases, head_dim, fused projections, experts)."""
    model = meta_model(conf)
    total = sum(p.numel() for p in model.parameters())
    experts = getattr(conf, "num_local_experts", None) or getattr(conf, "num_experts", None)
    active = getattr(conf, "num_experts_per_tok", None)
    share = active / experts if experts and active else 1.0  # routed experts: top-k of E run
    out = model.get_output_embeddings()
    matmul = 0.0
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))  # a tied head's weight counts as its matmul
        if _is_matmul(module) or module is out:
            n = sum(p.numel() for p in own if p.dim() >= 2)
            matmul += n * (share if ".experts." in f".{name}." else 1.0)
        elif ".experts" in f".{name}":  # fused expert banks: (experts, in, out) tensors
            matmul += sum(p.numel() for p in own if p.dim() >= 3) * share
    heads = int(conf.num_attention_heads)
    head_dim = int(getattr(conf, "head_dim", None) or conf.hidden_size // heads)
    return ModelStats(total, int(matmul), heads * head_dim, int(conf.num_hidden_layers),
                      int(conf.hidden_size), int(conf.vocab_size), heads)  # fmt: skip


def flops_per_token(conf: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul params + attention scores (PaLM appendix B).

    Forward matmul FLOPs per token are 2 x (per-token matmul weights, output head included);
    attention adds 2 x 2 x layers x seq x (heads x head_dim) (QK^T and AV, the full causal square
    as PaLM counts it). Backward is twice forward, hence the factor 3 over forward.
    """
    s = model_stats(conf)
    attention = 2 * 2 * s.num_layers * seq_len * s.attention_width
    return 3.0 * (2.0 * s.matmul_params + attention)
