"""Pure tensor helpers for packed rows: the packed forward, loss targets, token loss.

No ray, no deepspeed: unit-tested on the tiny model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "IGNORE_INDEX",
    "chunked_sum",
    "forward_packed",
    "loss_targets",
    "padding_mask",
    "token_loss",
]

IGNORE_INDEX = -100


def forward_packed(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq, vocab) logits of packed rows, each document attending only to itself.

    A packed row holds several documents whose ``position_ids`` restart at 0. Given those and no
    attention mask, transformers (``masking_utils``) finds the documents and builds each layer's
    own mask from them: causal per document, sliding-window layers (Mistral, Gemma, Qwen) keeping
    their window, a varlen call under flash-attention instead of a dense mask. A dense 4D mask
    would pass through unchanged and silently drop the windows; an all-ones 2D mask would turn
    the detection off, and so would a KV cache (``use_cache=False``: an exported model's config
    asks for one). The padding tail restarts at 0 too, so it is a document of its own.
    """
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


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


# Sequence positions per loss chunk: each chunk upcasts at most chunk x vocab logits to fp32.
LOSS_CHUNK_TOKENS = 1024

Part = tuple[Any, slice]


class _ChunkedSum(torch.autograd.Function):
    """``sum(fn(logits[p], targets[p]) for p in parts)``, each part recomputed in backward.

    ``parts`` index (rows, positions) and together cover ``logits[:, :-1]`` exactly once (the last
    position predicts nothing). Activation checkpointing per part would keep no more for backward,
    but each sliced part's backward materialises a zero gradient of the whole logits and adds it
    up: one logits-sized fill and add per part (8 of each per step at micro-batch 8, 20% of the
    quickstart's step time; per part of a 128k vocabulary, GBs each). Here the part gradients are
    written into one buffer, bit-identical to that path's.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, fn: Any, parts: list[Part]):
        ctx.save_for_backward(logits, targets)
        ctx.fn, ctx.parts = fn, parts
        total = fn(logits[parts[0]], targets[parts[0]])
        for p in parts[1:]:
            total = total + fn(logits[p], targets[p])
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        grad[:, -1].zero_()
        for p in ctx.parts:
            with torch.enable_grad():
                chunk = logits[p].detach().requires_grad_()
                (grad[p],) = torch.autograd.grad(ctx.fn(chunk, targets[p]), chunk, grad_out)
        return grad, None, None, None


def chunked_sum(
    fn: Any, logits: torch.Tensor, targets: torch.Tensor, parts: list[Part]
) -> torch.Tensor:
    """See :class:`_ChunkedSum`; ``targets`` (rows, seq-1) align with ``logits[:, :-1]``."""
    return _ChunkedSum.apply(logits, targets, fn, parts)


def _chunk_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of one (n, vocab) chunk."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss(
    logits: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy over (batch, seq-1) targets and the count of loss tokens.

    logits: (batch, seq, vocab) any float dtype; returned sums are 0-dim fp32 / int64 tensors on the
    logits' device (no host sync here). Computed over chunks of ``chunk_tokens`` positions, each
    recomputed in backward (:func:`chunked_sum`), so neither an fp32 copy of all the logits
    nor their log-softmax is ever held whole: at micro-batch 4, seq 2048 and a 128k vocabulary
    those are 4.3 GB each, against 0.5 GB per chunk.
    """
    count = (targets != IGNORE_INDEX).sum()
    seq = targets.shape[1]
    if logits.shape[0] * seq <= chunk_tokens:  # small: one call (the reshape copies, cheaply)
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        return _chunk_ce(flat, targets.reshape(-1)), count
    # logits[row, :-1] is a view; [:, :-1] would copy. logits[row, seq] has no target.
    parts = [(row, slice(start, min(start + chunk_tokens, seq)))
             for row in range(logits.shape[0]) for start in range(0, seq, chunk_tokens)]  # fmt: skip
    return chunked_sum(_chunk_ce, logits, targets, parts), count
