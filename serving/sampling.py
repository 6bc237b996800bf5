"""Per-request sampling: penalties, temperature, top-k/top-p, seeded draws and logprobs.

Pure functions over one sequence's logits row, so a request's draw depends only on its own logits and
its own ``torch.Generator``: a seeded request samples the same tokens whatever shares its batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = [
    "MAX_TOP_LOGPROBS",
    "SamplingParams",
    "TokenLogprob",
    "make_generator",
    "prompt_logprobs",
    "sample_token",
]

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What one sequence asks of the sampler. ``temperature == 0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: chosen token's logprob + k alternatives
    # None: off; k >= 0: every prompt token's logprob (+ k alternatives), from the prefill's own
    # forward pass. With max_tokens 0 the sequence ends after prefill (scoring only).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (0.0 <= self.temperature <= 2.0, "temperature must be in [0, 2]"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1, 0 or positive"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
                f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}]",
            ),
            (
                self.max_tokens >= 1 or self.prompt_logprobs is not None,
                "max_tokens 0 only scores the prompt: it needs prompt_logprobs",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability under the model, and the top alternatives.

    ``rank``: 1 + how many tokens the model found likelier (set for prompt tokens only).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


def make_generator(seed: int | None) -> torch.Generator:
    """One CPU generator per sequence; unseeded requests draw a fresh seed."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else random.getrandbits(63))
    return g


def _apply_penalties(logits: torch.Tensor, counts: torch.Tensor, p: SamplingParams) -> None:
    """OpenAI semantics, in place: logit -= count * frequency + (count > 0) * presence.

    logits, counts: (vocab,) float32; counts are this sequence's generated-token counts.
    """
    if p.frequency_penalty:
        logits -= counts * p.frequency_penalty
    if p.presence_penalty:
        logits -= (counts > 0).to(logits.dtype) * p.presence_penalty


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask tokens outside top-k and outside the smallest top-p nucleus; keeps >= 1 token."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def _logprob_of(raw: torch.Tensor, token: int, k: int) -> TokenLogprob:
    logp = torch.log_softmax(raw, dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        vals, ids = torch.topk(logp, min(k, logp.numel()))
        top = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(logp[token]), top=top)


def sample_token(
    raw: torch.Tensor,
    p: SamplingParams,
    generator: torch.Generator,
    counts: torch.Tensor | None,
) -> tuple[int, TokenLogprob | None]:
    """Pick the next token from one row of logits.

    raw: (vocab,) float32 on CPU, the model's logits; not modified. Logprobs are reported from the
    model's own distribution (before penalties and temperature), as vLLM does by default.
    """
    logits = raw
    if p.has_penalties and counts is not None:
        logits = raw.clone()
        _apply_penalties(logits, counts, p)
    if p.greedy:
        token = int(torch.argmax(logits))
    else:
        logits = _filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(logits, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=generator))
    lp = _logprob_of(raw, token, p.logprobs) if p.logprobs is not None else None
    return token, lp


def prompt_logprobs(
    logits: torch.Tensor, prompt_ids: list[int], k: int
) -> tuple[TokenLogprob | None, ...]:
    """Every prompt token's log-probability given the tokens before it (the first has none).

    logits: (len(prompt_ids), vocab), the prefill's logits at the prompt's positions (row i predicts
    token i + 1), any dtype and device. One log-softmax over the rows, then the chosen token's
    logprob and rank and the top ``k`` alternatives, moved to the CPU in one transfer each.
    """
    n = len(prompt_ids)
    if n < 2:
        return (None,)
    logp = torch.log_softmax(logits[: n - 1].float(), dim=-1)  # (n - 1, vocab)
    target = torch.tensor(prompt_ids[1:], device=logp.device)[:, None]
    chosen = logp.gather(1, target)  # (n - 1, 1)
    ranks = ((logp > chosen).sum(dim=1) + 1).tolist()
    if k > 0:
        vals, ids = torch.topk(logp, min(k, logp.shape[1]), dim=1)
        top_v, top_i = vals.tolist(), ids.tolist()
    else:
        top_v = top_i = [[] for _ in range(n - 1)]
    out: list[TokenLogprob | None] = [None]
    for j, (lp, rank) in enumerate(zip(chosen[:, 0].tolist(), ranks, strict=True)):
        top = tuple(zip(top_i[j], top_v[j], strict=True))
        out.append(TokenLogprob(prompt_ids[j + 1], lp, top, int(rank)))
    return tuple(out)
