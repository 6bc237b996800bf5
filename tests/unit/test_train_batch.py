"""Loss targets of packed rows and FLOPs per token (the packed forward: test_train_families)."""

from __future__ import annotations

import torch

from training.batch import IGNORE_INDEX, loss_targets, padding_mask, token_loss
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


def _loss_and_saved_bytes(hidden, head, targets, chunk_tokens):
    """(loss, loss count, head grad, bytes autograd kept for backward beyond the logits)."""
    head.grad = None
    logits = hidden @ head.T  # (batch, seq, vocab)
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, count = token_loss(logits, targets, chunk_tokens=chunk_tokens)
    total.backward()
    return total.detach(), count, head.grad.clone(), sum(kept.values())


def test_chunked_loss_equals_whole_and_keeps_less_for_backward() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, seq = 32_000, 65
    hidden = torch.randn(2, seq, 16, generator=g)
    head = torch.nn.Parameter(torch.randn(vocab, 16, generator=g) * 0.1)
    targets = torch.randint(0, vocab, (2, seq - 1), generator=g)
    targets[0, :5] = IGNORE_INDEX
    whole = _loss_and_saved_bytes(hidden, head, targets, chunk_tokens=10**9)
    chunked = _loss_and_saved_bytes(hidden, head, targets, chunk_tokens=16)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=0)
    assert int(chunked[1]) == int(whole[1]) == 2 * (seq - 1) - 5
    torch.testing.assert_close(chunked[2], whole[2], rtol=1e-6, atol=1e-9)
    # whole: an fp32 log-softmax of every position (2 x 65 x 32k x 4 B = 16 MB) held for backward
    assert whole[3] >= 2 * (seq - 1) * vocab * 4
    assert chunked[3] < whole[3] / 20


def _logits_sized_outputs_in_backward(loss_fn, logits: torch.Tensor) -> int:
    """How many ops in ``loss_fn(logits)``'s backward make a new tensor the size of the logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.numel() == logits.numel():
                Count.n += out.untyped_storage().data_ptr() not in inputs  # not a view (detach)
            return out

    loss = loss_fn(logits)
    with Count():
        loss.backward()
    return Count.n


def test_chunked_backward_writes_one_logits_gradient_whatever_the_chunk_count() -> None:
    """A backward per chunk must not add up a logits-sized gradient per chunk (a fill and an add
    of the whole logits each: 20% of the quickstart's step, GBs per chunk on a real vocabulary)."""
    from training.dpo import sequence_logps

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 33, 50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (8, 33), generator=g)
    chunks = {  # many chunks in each, one logits-sized gradient buffer
        "token_loss": lambda x: token_loss(x, targets[:, 1:], chunk_tokens=8)[0],
        "sequence_logps": lambda x: sequence_logps(x, targets, chunk_tokens=16)[0].sum(),
    }
    for name, fn in chunks.items():
        assert _logits_sized_outputs_in_backward(fn, logits) == 1, name
