"""Direct preference optimisation: pure batch and loss functions, no ray, no deepspeed.

The per-worker loop (``training.loop``), the reference job (``training.reference``) and
``raylm eval``'s preference task all score pairs through these, so a reference log-prob computed
in a Ray Data actor and one computed in a worker come from the same code on the same tensors.

What was followed:
- TRL ``trl/trainer/dpo_trainer.py``: ``concatenated_forward`` (chosen and rejected sides in one
  forward, chosen first), ``dpo_loss`` (``sigmoid`` with conservative label smoothing from cDPO,
  ``ipo`` as Eq. 17 of the IPO paper on log-probs averaged over answer tokens), rewards as
  beta x (policy - reference) log-prob, reward accuracy as chosen reward > rejected reward, and
  the optional NLL term on the chosen answer (TRL's ``rpo_alpha``).
- OpenRLHF ``openrlhf/models/loss.py`` ``DPOLoss`` and torchtune ``torchtune/rlhf/loss/dpo.py``:
  sequence log-probs summed over the answer tokens only, the same formulas.
Where raylm differs: every reduction is a sum that the caller divides by a count of the whole
optimizer step (pairs, or chosen answer tokens for the NLL term), so the gradient does not
depend on how the step's pairs are split over ranks and accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_pipelines.writer import PREFERENCE_COLUMNS
from training.batch import IGNORE_INDEX, LOSS_CHUNK_TOKENS, chunked_sum, forward_packed

__all__ = [
    "PAIR_COLUMNS",
    "REFERENCE_COLUMNS",
    "PairScores",
    "collate_pairs",
    "dpo_losses",
    "pair_scores",
    "reference_logps",
    "sequence_logps",
]

# Columns of a ``data.mode: preference`` row (one pair per row, each side unpadded).
PAIR_COLUMNS = PREFERENCE_COLUMNS
# Per-row reference log-probs (summed over the answer tokens) that travel with the rows when they
# were precomputed (``training.reference``); float64.
REFERENCE_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


def _rows(column: Any) -> list[np.ndarray]:
    """A ragged column (object array of 1-D arrays, or a list of lists) as a list of arrays."""
    return [np.asarray(x, dtype=np.int64) for x in column]


def collate_pairs(
    batch: dict[str, Any], pad_id: int, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """Preference rows -> one padded batch of 2 x pairs sequences, chosen sides first.

    Returns ``input_ids``, ``position_ids`` and ``labels``, (2 x pairs, L) int64, where L is the
    longest side in the batch (or ``pad_to``). Each sequence sits at the start of its row with
    positions 0..n-1; the padding tail is ``pad_id`` with positions restarting at 0 (a document of
    its own, as in packed rows) and labels -100, so it carries no loss and no real token attends
    to it. Reference columns, when present, pass through as (pairs,) float64.
    """
    seqs = _rows(batch["chosen_input_ids"]) + _rows(batch["rejected_input_ids"])
    labels = _rows(batch["chosen_labels"]) + _rows(batch["rejected_labels"])
    width = max(len(s) for s in seqs)
    if pad_to is not None:
        if pad_to < width:
            raise ValueError(f"a sequence of {width} tokens does not fit pad_to={pad_to}")
        width = pad_to
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    lab = np.full((len(seqs), width), IGNORE_INDEX, dtype=np.int64)
    pos = np.empty((len(seqs), width), dtype=np.int64)
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        n = len(s)
        if len(y) != n:
            raise ValueError(f"sequence {i}: {n} tokens but {len(y)} labels")
        ids[i, :n], lab[i, :n] = s, y
        pos[i, :n], pos[i, n:] = np.arange(n), np.arange(width - n)
    out = {"input_ids": ids, "position_ids": pos, "labels": lab}
    for name in REFERENCE_COLUMNS:
        if name in batch:
            out[name] = np.asarray(batch[name], dtype=np.float64)
    return out


def _row_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows,) fp32 summed log-probs of one chunk of (rows, n, vocab) logits, (rows, n) targets."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")  # fmt: skip
    return -flat.view(targets.shape).sum(dim=-1)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each sequence's labelled tokens and their count.

    logits (rows, L, vocab) any float dtype, labels (rows, L) with -100 where no loss (HF
    convention: logits[:, t] predicts labels[:, t+1]). Returns (rows,) fp32 log-probs and (rows,)
    int64 counts, on the logits' device. Chunked over positions like ``token_loss`` (each chunk
    recomputed in backward: ``training.batch.chunked_sum``), so no fp32 copy of all the logits is
    held at once.
    """
    targets = labels[:, 1:]
    counts = (targets != IGNORE_INDEX).sum(dim=-1)
    seq = targets.shape[1]
    if logits.shape[0] * seq <= chunk_tokens:
        return _row_logps(logits[:, :-1], targets), counts
    step = max(1, chunk_tokens // logits.shape[0])  # positions per chunk, over all rows
    parts = [(slice(None), slice(start, min(start + step, seq))) for start in range(0, seq, step)]
    return chunked_sum(_row_logps, logits, targets, parts), counts


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards of each side, all (pairs,).

    ``sigmoid``: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h) with
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected) (DPO Eq. 7; e > 0 is cDPO).
    ``ipo``: (h - 1 / (2 beta))^2 (IPO Eq. 17). Rewards: beta x (policy - reference), detached.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * h) * label_smoothing
    elif loss == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r} (sigmoid or ipo)")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


@dataclass
class PairScores:
    """One micro-batch of pairs scored by the policy (and its reference): sums, not means.

    Every field is a 0-dim fp32 tensor on the model's device (no host sync) except ``losses``
    (pairs,), so the caller divides by the counts of the whole step.
    """

    losses: torch.Tensor  # (pairs,) DPO loss per pair
    chosen_rewards: torch.Tensor  # sum over pairs of beta x (policy - ref) chosen log-prob
    rejected_rewards: torch.Tensor
    correct: torch.Tensor  # pairs whose chosen reward beats the rejected one
    chosen_nll: torch.Tensor  # summed NLL of the chosen answers' tokens (the SFT term)
    chosen_tokens: torch.Tensor  # answer tokens of the chosen sides


def pair_scores(
    model: Any,
    t: dict[str, torch.Tensor],
    reference: tuple[torch.Tensor, torch.Tensor],
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PairScores:
    """Forward the collated batch ``t`` (``collate_pairs`` on the device) through ``model`` once
    and score it against ``reference`` = (chosen, rejected) summed log-probs, each (pairs,).

    IPO compares log-probs averaged over the answer tokens (as TRL does); the sigmoid loss, the
    rewards and accuracy use the sums.
    """
    logits = forward_packed(model, t["input_ids"], t["position_ids"])
    sums, counts = sequence_logps(logits, t["labels"])  # (2 x pairs,) each
    pairs = sums.shape[0] // 2
    ref = torch.cat(reference).to(sums)
    policy = sums
    if loss == "ipo":  # length-normalised log-probs, the reference's too
        policy, ref = sums / counts.clamp(min=1), ref / counts.clamp(min=1)
    losses, cr, rr = dpo_losses(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta,
                                loss, label_smoothing)  # fmt: skip
    return PairScores(losses, cr.sum(), rr.sum(), (cr > rr).sum().float(), -sums[:pairs].sum(),
                      counts[:pairs].sum().float())  # fmt: skip


def reference_logps(model: Any, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed answer log-probs, each (pairs,), of a collated batch: the
    reference side, without grad."""
    with torch.no_grad():
        logits = forward_packed(model, t["input_ids"], t["position_ids"])
        logps, _ = sequence_logps(logits, t["labels"])
    pairs = logps.shape[0] // 2
    return logps[:pairs], logps[pairs:]
