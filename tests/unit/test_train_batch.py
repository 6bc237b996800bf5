"""Loss targets of packed rows and FLOPs per token (the packed forward: test_train_families)."""

from __future__ import annotations

import torch

from training.batch import IGNORE_INDEX, loss_targets, padding_mask
from training.config import ModelConfig
from training.model import build_model, flops_per_token


def test_targets_mask_padding_and_document_starts() -> None:
    pad = 0
    ids = torch.tensor([[5, 6, 2, 7, 8, 2, pad, pad]])
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 0, 1]])
    t = loss_targets(ids, pos, pad)
    assert t.tolist() == [[6, 2, IGNORE_INDEX, 8, 2, IGNORE_INDEX, IGNORE_INDEX]]


def test_padding_equal_to_eos_keeps_real_eos_in_loss() -> None:
    eos = pad = 2  # tokenizer without a pad token: pad falls back to EOS
    ids = torch.tensor([[5, eos, 7, eos, pad, pad]])
    pos = torch.tensor([[0, 1, 0, 1, 0, 1]])
    assert padding_mask(ids, pos, pad).tolist() == [[False, False, False, False, True, True]]
    assert loss_targets(ids, pos, pad).tolist() == [
        [eos, IGNORE_INDEX, eos, IGNORE_INDEX, IGNORE_INDEX]
    ]


def test_sft_labels_respected() -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    pos = torch.tensor([[0, 1, 2, 3]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8]])
    assert loss_targets(ids, pos, 0, labels).tolist() == [[IGNORE_INDEX, 7, 8]]


def test_flops_per_token_scales_with_size() -> None:
    small = build_model(ModelConfig(), vocab_size=97).config
    n_params = sum(p.numel() for p in build_model(ModelConfig(), vocab_size=97).parameters())
    f = flops_per_token(small, seq_len=64)
    # ~6N plus attention: within 2x of 6 x params for the tiny model.
    assert 3 * n_params < f < 12 * n_params
