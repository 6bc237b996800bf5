"""A :class:`serving.backend.Backend` over vLLM's ``AsyncLLM``, for CUDA GPU clusters.

Chosen with ``serve.engine.backend: vllm``. vLLM is imported only here, when the backend is built, so
the rest of raylm runs without it (it is not a raylm dependency and needs a CUDA GPU). The OpenAI HTTP
layer is the same as over the built-in engine: it hands this backend token ids and raylm
:class:`~serving.sampling.SamplingParams` and reads :class:`~serving.backend.TokenEvent` deltas back.

What maps where:

- batching, KV cache, sampling, stop strings and detokenization: vLLM's (``RequestOutputKind.DELTA``:
  each output carries only the new tokens and text);
- admission: the same budget as the built-in engine (``max_num_seqs`` running + ``max_waiting``
  queued, beyond that :class:`~serving.backend.EngineOverloaded`, so overload stays an OpenAI 503);
- cancellation (client gone) and ``request_timeout_s``: cancelling the task that iterates
  ``AsyncLLM.generate``, which aborts the request inside vLLM and frees its slot;
- request metrics: the same observer hooks (latency, TTFT, tokens/s); vLLM's own Prometheus metrics
  are separate;
- weights: safetensors only (``load_format``), LoRA adapters as vLLM ``LoRARequest`` over the base.
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any, cast

from serving.backend import (
    BackendUnavailable,
    EngineError,
    EngineOverloaded,
    EngineShutdown,
    RequestTimeout,
    TokenEvent,
    Usage,
)
from serving.config import EngineConfig
from serving.sampling import SamplingParams, TokenLogprob

__all__ = ["VllmBackend", "prompt_logprobs", "vllm_engine_kwargs", "vllm_sampling_kwargs"]

log = logging.getLogger("raylm.serving.vllm")
_ids = itertools.count()


def _import_vllm() -> Any:
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise BackendUnavailable(
            "serve.engine.backend=vllm needs the `vllm` package on the serving nodes (a CUDA GPU "
            f"build: pip install vllm), and it cannot be imported here ({exc}). "
            "Install it there, or set serve.engine.backend=builtin."
        ) from None


def vllm_sampling_kwargs(p: SamplingParams) -> dict[str, Any]:
    """raylm sampling parameters as ``vllm.SamplingParams`` keyword arguments (no vllm import)."""
    return {
        "n": 1,  # the HTTP layer submits one stream per choice
        # vLLM always samples: a scoring-only request (max_tokens 0) samples one token, which
        # the stream drops, as vLLM's own server does for echo with max_tokens 0.
        "max_tokens": max(p.max_tokens, 1),
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k if p.top_k > 0 else -1,  # -1: off in every vLLM version
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "seed": p.seed,
        "stop": list(p.stop) or None,
        "stop_token_ids": list(p.stop_token_ids) or None,
        "ignore_eos": p.ignore_eos,
        "logprobs": p.logprobs,
        "prompt_logprobs": p.prompt_logprobs,
    }


def vllm_engine_kwargs(model_dir: str, cfg: EngineConfig, adapter: str | None) -> dict[str, Any]:
    """``vllm.AsyncEngineArgs`` keyword arguments from the ``serve.engine`` section."""
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file()
        else model_dir,
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_batched_tokens,
        "load_format": "safetensors",
        "enable_lora": adapter is not None,
    }  # fmt: skip
    return {**kwargs, **cfg.vllm_engine_args}


def _logprob(token: int, entries: dict[int, Any] | None, k: int) -> TokenLogprob | None:
    """vLLM's {token id: Logprob(logprob, rank)} for one step -> TokenLogprob (top k by rank)."""
    if not entries or token not in entries:
        return None
    ranked = sorted(
        ((t, lp) for t, lp in entries.items() if lp.rank is not None and lp.rank <= k),
        key=lambda item: item[1].rank,
    )
    top = tuple((t, float(lp.logprob)) for t, lp in ranked)
    rank = entries[token].rank
    return TokenLogprob(token, float(entries[token].logprob), top, rank)


def prompt_logprobs(
    prompt_ids: list[int], entries: list[dict[int, Any] | None] | None, k: int
) -> tuple[TokenLogprob | None, ...] | None:
    """vLLM's ``RequestOutput.prompt_logprobs`` (per prompt token: None for the first, else
    {token id: Logprob}) -> one TokenLogprob (with rank) or None per prompt token."""
    if entries is None:
        return None
    pairs = zip(prompt_ids, entries, strict=False)
    return tuple(None if e is None else _logprob(t, e, k) for t, e in pairs)


class _VllmStream:
    """One request: a task iterates ``AsyncLLM.generate`` into a queue; cancelling it aborts in vLLM."""

    def __init__(self, backend: VllmBackend, prompt_ids: list[int], params: SamplingParams) -> None:
        self._b, self._params = backend, params
        self._prompt_ids, self._sent_prompt = prompt_ids, False
        self._prompt_len, self._completion = len(prompt_ids), 0
        self._items: asyncio.Queue[object] = asyncio.Queue()
        self._finished = False
        self._t_submit, self._t_first = time.monotonic(), None
        self._task = asyncio.get_running_loop().create_task(self._pump(prompt_ids))

    async def _pump(self, prompt_ids: list[int]) -> None:
        outcome = "error"
        try:
            async with asyncio.timeout(self._b.cfg.request_timeout_s):
                async for out in self._b.generate(prompt_ids, self._params):
                    ev = self._event(out.outputs[0], getattr(out, "prompt_logprobs", None))
                    self._items.put_nowait(ev)
                    if ev.finish_reason is not None:
                        outcome = ev.finish_reason
                        return
            self._items.put_nowait(EngineError("vLLM ended the request without a finish reason"))
        except TimeoutError:
            outcome = "timeout"
            limit = self._b.cfg.request_timeout_s
            self._items.put_nowait(RequestTimeout(f"request timed out after {limit}s"))
        except asyncio.CancelledError:
            outcome = "cancelled"  # vLLM's generate() aborted the request on the way out
            raise
        except Exception as exc:  # a failed request must reach the client as an error event
            self._items.put_nowait(EngineError(f"generation failed: {exc}"))
        finally:
            self._b.finished(
                self._t_submit, self._t_first, self._prompt_len, self._completion, outcome
            )

    def _event(self, out: Any, prompt_entries: Any = None) -> TokenEvent:
        """One DELTA CompletionOutput -> TokenEvent (vLLM's "abort" finish is never sent on).

        ``prompt_entries``: the RequestOutput's prompt logprobs, which DELTA outputs carry on the
        first output only; they go out on this stream's first event.
        """
        prompt_lps = None
        if self._params.prompt_logprobs is not None and not self._sent_prompt:
            k = self._params.prompt_logprobs
            prompt_lps = prompt_logprobs(self._prompt_ids, prompt_entries, k)
            self._sent_prompt = True
        if self._params.max_tokens == 0:  # scoring only: drop the token vLLM had to sample
            usage = Usage(self._prompt_len, 0)
            return TokenEvent((), "", (), "length", usage, prompt_lps)
        ids = tuple(int(t) for t in out.token_ids)
        self._completion += len(ids)
        if ids and self._t_first is None:
            self._t_first = time.monotonic()
        lps: tuple[TokenLogprob, ...] = ()
        if self._params.logprobs is not None and out.logprobs:
            # DELTA outputs carry one logprobs entry per new token.
            pairs = zip(ids, out.logprobs, strict=False)
            found = (_logprob(t, e, self._params.logprobs) for t, e in pairs)
            lps = tuple(lp for lp in found if lp is not None)
        finish = out.finish_reason if out.finish_reason in ("stop", "length") else None
        usage = Usage(self._prompt_len, self._completion) if finish else None
        return TokenEvent(ids, out.text or "", lps, finish, usage, prompt_lps)

    def __aiter__(self) -> _VllmStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        return self._took(await self._items.get())

    def _took(self, item: object) -> TokenEvent:
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        ev = cast(TokenEvent, item)
        self._finished = ev.finish_reason is not None
        return ev

    def ready(self) -> list[TokenEvent]:
        """Events already queued, without waiting (an error stays queued)."""
        out: list[TokenEvent] = []
        while not self._finished and not self._items.empty():
            item = self._items.get_nowait()
            if isinstance(item, BaseException):
                self._items.put_nowait(item)  # only one pump: nothing else can be queued after it
                break
            out.append(self._took(item))
        return out

    def cancel(self) -> None:
        self._finished = True
        self._task.cancel()


class VllmBackend:
    """vLLM ``AsyncLLM`` over an exported HF dir (+ optional LoRA). Implements ``Backend``."""

    def __init__(
        self,
        model_dir: str | Path,
        cfg: EngineConfig,
        observer: Any = None,
        adapter: str | Path | None = None,
    ) -> None:
        vllm = _import_vllm()
        from transformers import AutoTokenizer

        self.cfg, self.observer = cfg, observer
        adapter_dir = str(adapter) if adapter is not None else None
        kwargs = vllm_engine_kwargs(str(model_dir), cfg, adapter_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
        self._vllm = vllm
        self.engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(**kwargs))
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.default_max_tokens = cfg.default_max_tokens
        self._lora = None
        if adapter_dir is not None:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest(Path(adapter_dir).name, 1, adapter_dir)
        self._lock = threading.Lock()  # _inflight is read by stats() from Serve's threads
        self._inflight = 0
        self._closing = False
        self.counters = {"requests": 0, "completion_tokens": 0, "prompt_tokens": 0}

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> _VllmStream:
        """Queue one sequence; raises EngineOverloaded past running slots + waiting queue."""
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the context is {self.max_model_len}"
            )
        with self._lock:
            if self._closing:
                raise EngineShutdown("engine is shutting down")
            if self._inflight >= self.cfg.max_num_seqs + self.cfg.max_waiting:
                raise EngineOverloaded(f"server busy: {self._inflight} requests in flight")
            self._inflight += 1
            self.counters["requests"] += 1
        return _VllmStream(self, prompt_ids, params)

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> Any:
        """vLLM's async generator of DELTA ``RequestOutput``s for one sequence."""
        sp = self._vllm.SamplingParams(
            **vllm_sampling_kwargs(params),
            output_kind=self._vllm.sampling_params.RequestOutputKind.DELTA,
        )
        prompt = {"prompt_token_ids": list(prompt_ids)}
        rid = f"raylm-{next(_ids)}"
        return self.engine.generate(prompt, sp, rid, lora_request=self._lora)

    def finished(
        self, t_submit: float, t_first: float | None, prompt: int, completion: int, outcome: str
    ) -> None:
        """A stream ended (any outcome): free its admission slot, report its cost."""
        with self._lock:
            self._inflight -= 1
            self.counters["prompt_tokens"] += prompt
            self.counters["completion_tokens"] += completion
        if self.observer is None:
            return
        from serving.engine import RequestStats

        now = time.monotonic()
        ttft = t_first - t_submit if t_first is not None else None
        try:
            stats = RequestStats(ttft, now - t_submit, prompt, completion, outcome)
            self.observer.request_finished(stats)
        except Exception:
            log.warning("engine observer failed", exc_info=True)

    @property
    def closing(self) -> bool:
        return self._closing

    def is_ready(self) -> bool:
        return not self._closing and not getattr(self.engine, "errored", False)

    def stats(self) -> dict[str, float]:
        # vLLM does not split its own running and waiting queues for us: in flight counts as running.
        with self._lock:
            return {"running": self._inflight, "waiting": 0, **self.counters}

    def shutdown(self, timeout_s: float = 0.0) -> None:
        """Stop admitting; give in-flight requests ``timeout_s``, then stop vLLM (fails the rest)."""
        self._closing = True
        end = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < end:
            time.sleep(0.05)
        self.engine.shutdown()
