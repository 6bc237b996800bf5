"""Packed-row attention and loss targets on the tiny model (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from training.batch import IGNORE_INDEX, document_causal_mask, loss_targets, padding_mask
from training.config import ModelConfig
from training.model import build_model, flops_per_token


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_logits_inside_packed_row_equal_alone(attn: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(attn_implementation=attn), vocab_size=97).eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 97, (n,), generator=g) for n in (7, 12, 5)]
    row = torch.cat(docs)[None]  # (1, 24)
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(input_ids=row, position_ids=pos,
                       attention_mask=document_causal_mask(pos, torch.float32)).logits  # fmt: skip
        start = 0
        for d in docs:
            alone = model(input_ids=d[None]).logits
            torch.testing.assert_close(
                packed[:, start : start + len(d)], alone, rtol=1e-5, atol=1e-5
            )
            start += len(d)
        # Control: a plain causal mask (one document) lets the 2nd document see the 1st.
        one_doc = document_causal_mask(torch.arange(24)[None], torch.float32)
        leaky = model(input_ids=row, position_ids=pos, attention_mask=one_doc).logits
    assert not torch.allclose(leaky[:, 7:19], packed[:, 7:19], atol=1e-4)


def test_mask_shape_and_values() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    m = document_causal_mask(pos, torch.float32)
    allowed = (m == 0)[0, 0]
    assert m.shape == (1, 1, 5, 5)
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [False, False, False, True, False],
        [False, False, False, True, True],
    ]


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
