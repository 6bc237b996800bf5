"""LoRA adapters through ``peft``: wrap a built model, check names on the driver, rebuild at export.

No ray, no deepspeed. Only adapter weights (and ``modules_to_save``) require grad, so the engine's
optimizer holds just those and checkpoints exclude the frozen base, which a resume or an export
reloads from ``model.init_from``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.config import LoraConfig
from training.errors import TrainConfigError

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "apply_lora",
    "check_lora_targets",
    "embedding_modules",
    "load_adapter",
    "lora_param_counts",
    "peft_config",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"


def _uses_conv1d(model: torch.nn.Module) -> bool:
    """GPT-2-style ``Conv1D`` projections store (in, out) weights: peft needs fan_in_fan_out."""
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def peft_config(cfg: LoraConfig, model: torch.nn.Module | None = None) -> Any:
    from peft import LoraConfig as PeftLoraConfig

    targets = cfg.target_modules
    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        fan_in_fan_out=model is not None and _uses_conv1d(model),
        modules_to_save=list(cfg.modules_to_save) or None,
        # A trained copy of a tied embedding stays tied to the output head (and vice versa).
        ensure_weight_tying=bool(cfg.modules_to_save),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: torch.nn.Module, cfg: LoraConfig, activation_checkpointing: bool) -> Any:
    """The model wrapped in a ``PeftModel``; base weights frozen, adapters trainable."""
    from peft import get_peft_model

    if activation_checkpointing:
        # Checkpointed blocks need an input that requires grad, which a frozen embedding is not.
        model.enable_input_require_grads()
    return get_peft_model(model, peft_config(cfg, model))


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def embedding_modules(model: torch.nn.Module) -> tuple[str, str | None]:
    """(input embedding, output head or None when tied) module names, asked of the model itself
    (``embed_tokens``/``lm_head`` in Llama, ``wte`` with a tied head in GPT-2, ...)."""
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is None or out.weight is inp.weight
    return names[id(inp)], None if tied else names[id(out)]


def check_lora_targets(model: torch.nn.Module, cfg: LoraConfig) -> None:
    """Driver-side, on a meta-device model: every target and saved module names a module of the
    model. peft would only fail inside the workers."""
    modules = dict(model.named_modules())
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items()
                     if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})  # fmt: skip
    targets = [] if isinstance(cfg.target_modules, str) else cfg.target_modules
    for key, wanted in (("target_modules", targets), ("modules_to_save", cfg.modules_to_save)):
        missing = [t for t in wanted if not any(_matches(n, t) for n in modules if n)]
        if missing:
            raise TrainConfigError(
                f"train.lora.{key}: {missing} not in the model; its linear modules are {linear}"
            )


def lora_param_counts(model: torch.nn.Module, cfg: LoraConfig) -> tuple[int, int]:
    """(total, trainable) parameters once adapters are on ``model`` (a meta-device model: the
    adapters are built on meta too, no memory)."""
    from peft import get_peft_model

    with torch.device("meta"):
        wrapped = get_peft_model(model, peft_config(cfg, model))
    total = sum(p.numel() for p in wrapped.parameters())
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return total, trainable


def load_adapter(base: torch.nn.Module, adapter_dir: Path, state: dict[str, torch.Tensor]) -> Any:
    """``base`` wrapped with the adapter config saved in ``adapter_dir`` and the trained tensors
    ``state`` (names as the training module had them); every adapter tensor must be present."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model = get_peft_model(base, PeftLoraConfig.from_pretrained(str(adapter_dir)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(state))
    # Tied modules_to_save copies may appear under both names (embedding and output head).
    params = dict(model.named_parameters(remove_duplicate=False))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"{adapter_dir}: adapter tensors do not fit the config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")  # fmt: skip
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))
    return model
