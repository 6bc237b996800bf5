"""The CUDA paths of packed attention and the chunked loss (skipped without CUDA; run by
`bash bench/gpu/run.sh --tests` when a GPU is lent).

The CPU suite covers sdpa/eager on CPU (tests/unit/test_train_families.py); here the same property
is checked with the kernels a GPU run uses: sdpa on CUDA in bf16 and, where the `flash-attn`
package is installed, flash-attention 2's varlen path (transformers reads the documents off
``position_ids``). Tiny random configs built by transformers, no downloads.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.families import SLIDING, tiny_config
from training.batch import forward_packed, token_loss

KERNELS = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def _model(family: str, kernel: str) -> torch.nn.Module:
    torch.manual_seed(0)
    conf = tiny_config(family, 97)
    try:
        model = AutoModelForCausalLM.from_config(conf, attn_implementation=kernel,
                                                 dtype=torch.bfloat16)  # fmt: skip
    except ValueError as exc:  # Gemma 2 has no sdpa path (soft-capping)
        pytest.skip(f"{family}: no {kernel} ({exc})"[:200])
    return model.cuda().eval()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", ["llama", *SLIDING])
def test_document_logits_inside_packed_row_equal_alone_on_cuda(family: str, kernel: str) -> None:
    model = _model(family, kernel)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 97, (n,), generator=g).cuda() for n in (7, 12, 5)]
    row = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None].cuda()
    with torch.no_grad():
        packed = forward_packed(model, row, pos).float()
        start = 0
        for d in docs:
            alone = model(input_ids=d[None], use_cache=False).logits.float()
            # bf16: measured on CPU, packed vs alone differ by <= 0.05, a leak by >= 2.9
            assert float((packed[:, start : start + len(d)] - alone).abs().max()) < 0.1
            start += len(d)
        leaky = forward_packed(model, row, torch.arange(24, device="cuda")[None]).float()
    assert float((leaky[:, 7:19] - packed[:, 7:19]).abs().max()) > 1.0


def _peak(fn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(loss, gradient, peak bytes allocated above the start) of ``fn()`` and its backward."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, logits = fn()
    (grad,) = torch.autograd.grad(loss, logits)
    torch.cuda.synchronize()
    return loss.detach(), grad, torch.cuda.max_memory_allocated() - base


def test_chunked_loss_equals_whole_and_peaks_lower_on_cuda() -> None:
    """bf16 logits of a 128k vocabulary: the chunked loss and its gradient equal the whole-tensor
    fp32 cross-entropy, at a lower peak allocation."""
    torch.manual_seed(0)
    batch, seq, vocab = 2, 2048, 128_256
    logits = torch.randn(batch, seq, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (batch, seq - 1), device="cuda")

    def whole():
        flat = logits[:, :-1].float().reshape(-1, vocab)
        return torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="sum"), logits

    ref, ref_grad, ref_peak = _peak(whole)
    del ref_grad
    total, grad, peak = _peak(lambda: (token_loss(logits, targets)[0], logits))
    assert float(total) == pytest.approx(float(ref), rel=1e-4)
    _, ref_grad, _ = _peak(whole)
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-3)
    assert peak < 0.6 * ref_peak, (peak, ref_peak)
