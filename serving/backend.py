"""What the HTTP layer needs from an inference backend, so another engine (e.g. vLLM) can plug in.

The built-in :class:`serving.engine.Engine` implements it on CPU or GPU with plain ``transformers``;
:class:`serving.vllm_backend.VllmBackend` wraps vLLM on CUDA GPUs. ``serve.engine.backend`` picks one
(:func:`load_backend`); each is imported only when chosen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from serving.sampling import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from serving.config import EngineConfig

__all__ = [
    "Backend",
    "BackendUnavailable",
    "EngineError",
    "EngineOverloaded",
    "EngineShutdown",
    "GenerationStream",
    "RequestTimeout",
    "TokenEvent",
    "Usage",
    "load_backend",
    "merge_events",
]


class EngineError(RuntimeError):
    """A request the engine could not finish."""


class EngineOverloaded(EngineError):
    """The waiting queue is full; the client should retry later (HTTP 503 + Retry-After)."""


class RequestTimeout(EngineError):
    """The request ran past its per-request timeout; its slot was freed."""


class EngineShutdown(EngineError):
    """The engine stopped before the request finished."""


class BackendUnavailable(RuntimeError):
    """The configured backend cannot run here (e.g. vllm not installed)."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenEvent:
    """One decode step of one sequence.

    ``text`` is the newly final text (may be "" while a stop string or a UTF-8 character is pending).
    The last event has ``finish_reason`` ("stop" or "length") and ``usage``. A sequence that asked
    for ``prompt_logprobs`` gets them on its first event, one entry per prompt token (the first
    token's is None); with ``max_tokens`` 0 that is its only event, with no tokens.
    """

    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


def merge_events(events: list[TokenEvent]) -> TokenEvent:
    """Several consecutive events of one sequence as one (the last one's finish and usage)."""
    if len(events) == 1:
        return events[0]
    return TokenEvent(
        token_ids=tuple(t for ev in events for t in ev.token_ids),
        text="".join(ev.text for ev in events),
        logprobs=tuple(lp for ev in events for lp in ev.logprobs),
        finish_reason=events[-1].finish_reason,
        usage=events[-1].usage,
        prompt_logprobs=events[0].prompt_logprobs,
    )


class GenerationStream(Protocol):
    """Async iterator of one sequence's events; ``cancel`` frees its slot at the next step."""

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    async def __anext__(self) -> TokenEvent: ...

    def cancel(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """Tokens in, tokens out. ``tokenizer`` is a HF tokenizer (chat template, encode, decode)."""

    tokenizer: Any
    max_model_len: int
    default_max_tokens: int

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationStream:
        """Queue a sequence; raises EngineOverloaded at once when the waiting queue is full."""
        ...

    @property
    def closing(self) -> bool:
        """True once shutdown started (an evicted or stopping backend)."""
        ...

    def is_ready(self) -> bool: ...

    def stats(self) -> dict[str, float]: ...

    def shutdown(self, timeout_s: float = 0.0) -> None: ...


def load_backend(
    model_dir: str | Path,
    cfg: EngineConfig,
    observer: Any = None,
    adapter: str | Path | None = None,
) -> Backend:
    """The backend ``cfg.backend`` names, loaded and ready (blocks for seconds: call off the loop).

    ``observer``: a :class:`serving.engine.EngineObserver` for request metrics.
    """
    if cfg.backend == "vllm":
        from serving.vllm_backend import VllmBackend

        return VllmBackend(model_dir, cfg, observer, adapter)
    from serving.engine import Engine

    return Engine(model_dir, cfg, observer, adapter)
