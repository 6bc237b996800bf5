"""Pure tensor helpers for packed rows: per-document attention mask, loss targets, token loss.

No ray, no deepspeed: unit-tested on the tiny model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "document_causal_mask",
    "loss_targets",
    "padding_mask",
    "token_loss",
]

IGNORE_INDEX = -100


def document_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask (batch, 1, seq, seq): 0 where query i may attend key j, dtype-min elsewhere.

    A packed row holds several documents whose ``position_ids`` restart at 0; token i may attend
    j iff j <= i and both lie in the same document (document index = number of 0s up to and
    including the token). transformers passes a 4D mask through unchanged to sdpa and eager
    attention, so a document inside a packed row sees exactly what it would see alone. An
    additive float mask (not bool) works for both kernels. Memory: batch x seq^2 x dtype bytes.
    """
    doc = (position_ids == 0).cumsum(dim=-1)  # (B, S) document index per token
    same_doc = doc[:, :, None] == doc[:, None, :]  # (B, S, S)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril_()
    allowed = (same_doc & causal)[:, None]  # (B, 1, S, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def padding_mask(input_ids: torch.Tensor, position_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(batch, seq) bool, True on padding.

    The packer pads only the tail of a row, as its own segment (positions restart at 0). Padding is
    therefore the last segment when it is all ``pad_id``; a bare ``input_ids == pad_id`` test would
    also hit real EOS tokens when the tokenizer has no pad token and pad_id falls back to EOS.
    """
    doc = (position_ids == 0).cumsum(dim=-1)
    last = doc == doc[:, -1:]
    last_all_pad = ((input_ids == pad_id) | ~last).all(dim=-1, keepdim=True)
    return last & last_all_pad


def loss_targets(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    pad_id: int,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token targets (batch, seq-1) for logits[:, :-1], with IGNORE_INDEX where no loss.

    Target t+1 carries no loss when it is padding, when it starts a new document (position 0: it
    cannot be predicted from the previous document, which it may not attend to), or, for SFT,
    when ``labels`` marks it -100.
    """
    source = input_ids if labels is None else labels
    targets = source[:, 1:].clone()
    pad = padding_mask(input_ids, position_ids, pad_id)
    ignore = pad[:, 1:] | (position_ids[:, 1:] == 0)
    return targets.masked_fill_(ignore, IGNORE_INDEX)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy over (batch, seq-1) targets and the count of loss tokens.

    logits: (batch, seq, vocab) any float dtype; returned sums are 0-dim fp32 / int64 tensors on the
    logits' device (no host sync here).
    """
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()
