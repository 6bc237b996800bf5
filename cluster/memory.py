"""Training memory estimate per worker: parameters, gradients, optimizer states, activations.

Pure arithmetic (no torch, no Ray), for ``raylm doctor``. The model-state accounting is the ZeRO
paper's (Rajbhandari et al. 2020, sec. 3 and 5), with Adam:

- mixed precision (bf16/fp16): 2 bytes/param for the weights, 2 for gradients, K = 12 for the
  optimizer (fp32 master weights, momentum, variance);
- fp32: 4 + 4, and K = 8 (momentum, variance; the weights are the master copy).

Over N data-parallel ranks ZeRO-1 shards the optimizer states (K/N), ZeRO-2 also the gradients,
ZeRO-3 also the weights. The paper's example: 7.5B params, N = 64, mixed precision -> 120 GB per rank
without ZeRO, 31.4 GB with ZeRO-1, 16.6 GB with ZeRO-2, 1.9 GB with ZeRO-3 (the unit test checks
these). Offload moves the optimizer states (and under ZeRO-3 the weights) to host memory.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation"), per layer and
micro-batch: ``s*b*h*(34 + 5*a*s/h)`` bytes with 2-byte activations (doubled for fp32), or only the
layer input (``2*s*b*h``) with activation checkpointing plus one layer recomputed; plus the fp32
logits and their gradient (``2 * 4*s*b*V``). An estimate: allocator slack, communication buffers
and the framework itself come on top (``host_overhead_bytes`` per worker process).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GIB", "MemoryEstimate", "ModelShape", "estimate_memory", "human_bytes"]

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """What the activation estimate needs of a decoder (parameter counts come separately, from
    the real architecture: ``training.model.model_stats``)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per worker. ``device`` is GPU memory when training on GPUs, else host memory too."""

    params: float
    grads: float
    optimizer: float
    activations: float
    offloaded: float  # optimizer states / weights moved to host memory by ZeRO offload

    @property
    def device_bytes(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def describe(self) -> str:
        parts = [("params", self.params), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("activations", self.activations)]  # fmt: skip
        text = ", ".join(f"{k} {human_bytes(b)}" for k, b in parts)
        if self.offloaded:
            text += f"; offloaded to host {human_bytes(self.offloaded)}"
        return f"{text} per worker"


def human_bytes(n: float) -> str:
    """``1.5 GiB``, ``12.0 MiB``: binary units, one decimal."""
    for unit, size in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _activation_bytes(
    shape: ModelShape, seq_len: int, micro_batch: int, act_bytes: int, checkpointing: bool
) -> float:
    s, b, h, a = seq_len, micro_batch, shape.hidden_size, shape.num_heads
    # Korthikanti et al.: 34*s*b*h + 5*a*s^2*b bytes per layer with 2-byte activations.
    layer = s * b * h * (34 + 5 * a * s / h) * (act_bytes / 2)
    if checkpointing:
        layers = shape.num_layers * s * b * h * act_bytes + layer  # inputs kept, one recomputed
    else:
        layers = shape.num_layers * layer
    logits = 2 * 4 * s * b * shape.vocab_size  # fp32 logits for the loss and their gradient
    return layers + logits


def estimate_memory(
    total_params: int,
    trainable_params: int,
    shape: ModelShape,
    *,
    world_size: int,
    zero_stage: int,
    precision: str,
    seq_len: int,
    micro_batch: int,
    activation_checkpointing: bool = False,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> MemoryEstimate:
    """Per-worker model states (ZeRO accounting) and activations for one micro-batch."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"deepspeed.precision: unknown {precision!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage: {zero_stage} is not 0-3")
    mixed = precision != "fp32"
    p_bytes, g_bytes, k = (2, 2, 12) if mixed else (4, 4, 8)
    n = max(1, world_size)
    params = p_bytes * total_params / (n if zero_stage >= 3 else 1)
    grads = g_bytes * trainable_params / (n if zero_stage >= 2 else 1)
    optimizer = k * trainable_params / (n if zero_stage >= 1 else 1)
    offloaded = 0.0
    if offload_optimizer:
        offloaded, optimizer = offloaded + optimizer, 0.0
    if offload_params:
        offloaded, params = offloaded + params, 0.0
    acts = _activation_bytes(shape, seq_len, micro_batch, p_bytes, activation_checkpointing)
    return MemoryEstimate(params, grads, optimizer, acts, offloaded)
