"""The built-in inference engine: KV-cached decoding with continuous (iteration-level) batching.

No Ray here. One background thread owns the model and runs the step loop:

    reap (cancelled / timed out) -> admit (budget) -> batched prefill of newcomers -> one decode step

The running batch keeps one left-padded KV cache (per layer: (B, heads, T, head_dim)) with a (B, T)
attention mask; each row feeds its own position id, so padding never shifts a sequence. Newcomers are
prefilled together, then their cache is left-padded and concatenated onto the batch; finished rows are
dropped with an index select, and all-padding columns are trimmed. Caches are only copied when the
batch changes, never recomputed.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch

from serving.backend import (
    EngineError,
    EngineOverloaded,
    EngineShutdown,
    RequestTimeout,
    TokenEvent,
    Usage,
)
from serving.config import EngineConfig
from serving.detok import IncrementalDetokenizer
from serving.sampling import (
    SamplingParams,
    TokenLogprob,
    make_generator,
    prompt_logprobs,
    sample_token,
)

__all__ = ["Completion", "Engine", "EngineObserver", "RequestStats", "load_model"]

log = logging.getLogger("raylm.serving.engine")


def _pick_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _pick_dtype(cfg: EngineConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def load_model(
    model_dir: str | Path, cfg: EngineConfig, adapter: str | Path | None = None
) -> tuple[Any, Any, torch.device]:
    """Load an exported HF dir (safetensors only) -> (model in eval mode, tokenizer, device).

    ``adapter``: a PEFT LoRA dir trained over ``model_dir``; it is merged into the weights, so the
    engine runs it at base-model speed (each adapter holds its own merged copy).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model dir (no config.json)")
    device = _pick_device(cfg)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), use_safetensors=True, dtype=_pick_dtype(cfg, device)
    )
    tok_dir = path
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: not a PEFT adapter dir (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tok_dir = Path(adapter)  # an adapter may ship its own chat template
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return model, tokenizer, device


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """generation_config's eos ids (the export puts the end-of-turn token there) + the tokenizer's."""
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


@dataclass(eq=False)
class _Seq:
    """One sequence's state, owned by the engine thread (``cancelled`` may be set from outside)."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    deadline: float
    generator: torch.Generator
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]
    counts: torch.Tensor | None = None  # (vocab,) float32 generated-token counts, for penalties
    prompt_lps: tuple[TokenLogprob | None, ...] | None = None  # until sent on the first event
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    t_submit: float = field(default_factory=time.monotonic)
    t_first: float | None = None  # first token sampled

    def send(self, item: object) -> None:
        try:
            self.emit(item)
        except RuntimeError:  # the consumer's event loop is gone: nobody is listening
            self.cancelled = True


@dataclass(eq=False)
class _Batch:
    """The running batch: rows align with ``seqs``."""

    seqs: list[_Seq]
    cache: Any  # transformers DynamicCache, per layer keys/values (B, heads, T, head_dim)
    mask: torch.Tensor  # (B, T) int64, 1 = real token
    lengths: torch.Tensor  # (B,) int64, real tokens in cache = next position id
    last: torch.Tensor  # (B,) int64, the token each row feeds next

    def select(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (in order), then trim columns that are padding in every row."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.seqs = [self.seqs[i] for i in keep]
        self.mask, self.lengths, self.last = self.mask[idx], self.lengths[idx], self.last[idx]
        used = self.mask.sum(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys[idx, :, start:]
            layer.values = layer.values[idx, :, start:]
        self.mask = self.mask[:, start:]

    def extend(self, other: _Batch) -> None:
        """Append ``other``'s rows, left-padding whichever cache is shorter."""
        t = max(self.mask.shape[1], other.mask.shape[1])

        def lpad(x: torch.Tensor, dim_from_end: int) -> torch.Tensor:
            n = t - x.shape[-dim_from_end]
            if n == 0:
                return x
            pad = [0, 0] * (dim_from_end - 1) + [n, 0]
            return torch.nn.functional.pad(x, pad)

        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([lpad(mine.keys, 2), lpad(theirs.keys, 2)])
            mine.values = torch.cat([lpad(mine.values, 2), lpad(theirs.values, 2)])
        self.mask = torch.cat([lpad(self.mask, 1), lpad(other.mask, 1)])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.last = torch.cat([self.last, other.last])
        self.seqs = self.seqs + other.seqs


@dataclass(frozen=True)
class RequestStats:
    """What one finished sequence cost; reported to the observer (metrics) on the engine thread."""

    ttft_s: float | None  # submit -> first token (None: never produced one)
    e2e_s: float  # submit -> end
    prompt_tokens: int
    completion_tokens: int
    outcome: str  # "stop" | "length" | "cancelled" | "timeout" | "error"


class EngineObserver(Protocol):
    """Metrics hooks; called on the engine thread, so they must be cheap and thread-safe."""

    def request_finished(self, stats: RequestStats) -> None: ...

    def step(self, running: int, waiting: int) -> None: ...


@dataclass(frozen=True)
class Completion:
    """A finished sequence, as returned by :meth:`Engine.generate_sync`."""

    token_ids: list[int]
    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob]
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


class _AsyncStream:
    """Events of one sequence delivered onto the submitting event loop (thread-safe hand-off)."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._loop = loop
        self._items: deque[object] = deque()  # touched only on the loop's thread
        self._wake = asyncio.Event()
        self._finished = False
        self.seq: _Seq | None = None

    def put(self, item: object) -> None:  # called on the engine thread
        self._loop.call_soon_threadsafe(self._push, item)

    def _push(self, item: object) -> None:
        self._items.append(item)
        self._wake.set()

    def __aiter__(self) -> _AsyncStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        while not self._items:
            self._wake.clear()
            await self._wake.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return self._took(cast(TokenEvent, item))

    def _took(self, ev: TokenEvent) -> TokenEvent:
        if ev.finish_reason is not None:
            self._finished = True
        return ev

    def ready(self) -> list[TokenEvent]:
        """Events already delivered and not yet read, without waiting (an error stays queued)."""
        out: list[TokenEvent] = []
        while not self._finished and self._items and isinstance(self._items[0], TokenEvent):
            out.append(self._took(cast(TokenEvent, self._items.popleft())))
        return out

    def cancel(self) -> None:
        if not self._finished and self.seq is not None:
            self._finished = True
            self._engine.cancel(self.seq)


class Engine:
    """Continuous-batching generator over one HF model dir. Implements :class:`serving.backend.Backend`.

    Thread model: the caller's threads only enqueue/cancel under ``_cv``; the engine thread alone touches
    the model, the batch and the sequences' sampling state.
    """

    def __init__(
        self,
        model_dir: str | Path,
        cfg: EngineConfig | None = None,
        observer: EngineObserver | None = None,
        adapter: str | Path | None = None,
    ) -> None:
        self.cfg = cfg or EngineConfig()
        self.observer = observer
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.model_dir = str(model_dir)
        self.model, self.tokenizer, self.device = load_model(model_dir, self.cfg, adapter)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.max_model_len = int(
            self.cfg.max_model_len or getattr(self.model.config, "max_position_embeddings", 2048)
        )
        self.default_max_tokens = self.cfg.default_max_tokens
        self._pad_id = int(self.tokenizer.pad_token_id or 0)
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._batch: _Batch | None = None
        # Admitted, not yet in the batch (failed together with it on error).
        self._prefilling: list[_Seq] = []
        # Events of this step, sent after the batch state is updated so that a client that sees
        # its last event also sees its slot freed (stats, overload checks).
        self._outbox: list[tuple[_Seq, object]] = []
        self._n_running = 0  # len(self._batch.seqs), readable without the engine thread
        self._closing = False
        self._stopped = False
        self._ready = False
        self.counters = {"requests": 0, "completion_tokens": 0, "prompt_tokens": 0}
        self._thread = threading.Thread(target=self._loop, name="raylm-engine", daemon=True)
        self._thread.start()
        if self.cfg.warmup:
            self.generate_sync([self._pad_id], SamplingParams(max_tokens=2, temperature=0.0))
        self._ready = True

    # ---- public API -------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> _AsyncStream:
        """Queue one sequence; events arrive on the running event loop. Raises EngineOverloaded."""
        stream = _AsyncStream(self, asyncio.get_running_loop())
        stream.seq = self._enqueue(prompt_ids, params, stream.put)
        return stream

    def generate_sync(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """Blocking generation from any thread (warmup, eval, benchmarks)."""
        q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._enqueue(prompt_ids, params, q.put)
        ids: list[int] = []
        texts: list[str] = []
        lps: list[TokenLogprob] = []
        prompt_lps = None
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            item = cast(TokenEvent, item)
            ids += item.token_ids
            texts.append(item.text)
            lps += item.logprobs
            prompt_lps = prompt_lps or item.prompt_logprobs
            if item.finish_reason is not None:
                usage = item.usage or Usage(len(prompt_ids), len(ids))
                text = "".join(texts)
                return Completion(ids, text, item.finish_reason, usage, lps, prompt_lps)

    def cancel(self, seq: _Seq) -> None:
        """Free the sequence's slot: a waiting one leaves the queue now, a running one next step."""
        with self._cv:
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
                self._close(seq, "cancelled")
            self._cv.notify()

    @property
    def closing(self) -> bool:
        """True once shutdown started (an evicted or stopping engine)."""
        return self._closing

    def is_ready(self) -> bool:
        return self._ready and not self._closing and self._thread.is_alive()

    def stats(self) -> dict[str, float]:
        with self._cv:
            waiting = len(self._waiting)
        return {"running": self._n_running, "waiting": waiting, **self.counters}

    def shutdown(self, timeout_s: float = 0.0) -> None:
        """Stop admitting; let in-flight work finish for up to ``timeout_s``, then fail the rest."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and (self._n_running or self._waiting):
            time.sleep(0.02)
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ---- submission -------------------------------------------------------------------------

    def _enqueue(
        self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[object], None]
    ) -> _Seq:
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens; the context is {self.max_model_len}"
            )
        stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else self.eos_ids
        )
        seq = _Seq(
            prompt_ids=list(prompt_ids),
            params=params,
            emit=emit,
            deadline=time.monotonic() + self.cfg.request_timeout_s,
            generator=make_generator(params.seed),
            detok=IncrementalDetokenizer(self.tokenizer, params.stop),
            stop_ids=stop_ids,
        )
        with self._cv:
            if self._closing:
                raise EngineShutdown("engine is shutting down")
            if len(self._waiting) >= self.cfg.max_waiting + max(
                0, self.cfg.max_num_seqs - self._n_running
            ):
                raise EngineOverloaded(
                    f"server busy: {self._n_running} running, {len(self._waiting)} waiting"
                )
            self._waiting.append(seq)
            self.counters["requests"] += 1
            self._cv.notify()
        return seq

    # ---- engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._waiting and self._batch is None:
                    self._cv.wait()
                if self._stopped:
                    break
            try:
                self._step()
            except Exception as exc:  # one bad step must not kill the replica: fail its rows
                log.exception("engine step failed")
                self._fail_all(EngineError(f"generation failed: {exc}"), waiting=False)
        self._fail_all(EngineShutdown("engine stopped before the request finished"), waiting=True)

    def _fail_all(self, exc: EngineError, waiting: bool) -> None:
        seqs = list(self._batch.seqs) if self._batch is not None else []
        seqs += self._prefilling
        self._batch, self._n_running, self._prefilling = None, 0, []
        if waiting:
            with self._cv:
                seqs += list(self._waiting)
                self._waiting.clear()
        for seq in seqs:
            if not seq.done:
                self._close(seq, "error" if not waiting else "cancelled")
                seq.send(exc)

    @torch.inference_mode()
    def _step(self) -> None:
        try:
            self._reap()
            self._prefilling = self._admit()
            if self._prefilling:
                self._prefill(self._prefilling)
                self._prefilling = []
                # Newcomers' first tokens go out now, not after this step's decode: TTFT is one
                # prefill, not prefill + a decode of the whole batch.
                self._send_outbox()
            if self._batch is not None:
                self._decode()
        finally:
            self._send_outbox()
            if self.observer is not None:
                self._observe(self.observer.step, self._n_running, len(self._waiting))

    def _send_outbox(self) -> None:
        """Deliver queued events; called only once the batch state reflects them (slots freed)."""
        outbox, self._outbox = self._outbox, []
        for seq, item in outbox:
            seq.send(item)

    def _reap(self) -> None:
        """Drop cancelled and timed-out rows from the running batch (frees their slots)."""
        if self._batch is None:
            return
        now = time.monotonic()
        keep = []
        for i, seq in enumerate(self._batch.seqs):
            if not seq.cancelled and now > seq.deadline:
                timeout = RequestTimeout(f"request timed out after {self.cfg.request_timeout_s}s")
                self._outbox.append((seq, timeout))
                self._close(seq, "timeout")
            elif seq.cancelled:
                self._close(seq, "cancelled")
            else:
                keep.append(i)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        if self._batch is None or not keep:
            self._batch = None
        elif len(keep) < len(self._batch.seqs):
            self._batch.select(keep)
        self._n_running = len(keep)

    def _admit(self) -> list[_Seq]:
        """Pop waiting sequences that fit the slot and prefill-token budgets (at least one)."""
        chosen: list[_Seq] = []
        with self._cv:
            slots = self.cfg.max_num_seqs - self._n_running
            longest = 0
            while self._waiting and len(chosen) < slots:
                seq = self._waiting[0]
                # Padded prefill cost: every row is as long as the longest prompt.
                cost = max(longest, len(seq.prompt_ids)) * (len(chosen) + 1)
                if chosen and cost > self.cfg.max_batched_tokens:
                    break
                self._waiting.popleft()
                if time.monotonic() > seq.deadline:
                    self._close(seq, "timeout")
                    self._outbox.append((seq, RequestTimeout("request timed out while waiting")))
                    continue
                chosen.append(seq)
                longest = max(longest, len(seq.prompt_ids))
            self._n_running += len(chosen)  # counted as running from admission on (overload check)
        return chosen

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Prefill the newcomers; sequences scoring their prompt go in a forward of their own.

        Only that forward keeps every position's logits (batch, width, vocab); the others keep the
        last position's, so a request that asks for no prompt logprobs pays nothing for them.
        """
        plain = [s for s in seqs if s.params.prompt_logprobs is None]
        scoring = [s for s in seqs if s.params.prompt_logprobs is not None]
        for group in (plain, scoring):
            if group:
                self._prefill_group(group, all_logits=group is scoring)

    def _prefill_group(self, seqs: list[_Seq], all_logits: bool) -> None:
        """One left-padded forward over the prompts; their first token joins the batch."""
        from transformers import DynamicCache

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
            self.counters["prompt_tokens"] += len(seq.prompt_ids)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (b, width): real positions, pads at 0
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,  # 0: every position
        )
        if all_logits:
            for row, seq in enumerate(seqs):  # row's real positions: the last len(prompt) columns
                k = cast(int, seq.params.prompt_logprobs)
                seq.prompt_lps = prompt_logprobs(
                    out.logits[row, width - len(seq.prompt_ids) :], seq.prompt_ids, k
                )
        tokens, keep = self._sample(seqs, out.logits[:, -1, :])
        del out  # all_logits: (b, width, vocab), freed before the batch grows
        new = _Batch(seqs, cache, mask, mask.sum(1), tokens.to(self.device))
        if len(keep) < len(seqs):
            if not keep:
                self._n_running = len(self._batch.seqs) if self._batch is not None else 0
                return
            new.select(keep)
        if self._batch is None:
            self._batch = new
        else:
            self._batch.extend(new)
        self._n_running = len(self._batch.seqs)

    def _decode(self) -> None:
        """One token for every running row: input (B, 1), positions (B, 1), mask (B, T + 1)."""
        b = cast(_Batch, self._batch)  # _step calls this only with a running batch
        ones = torch.ones((b.mask.shape[0], 1), dtype=b.mask.dtype, device=b.mask.device)
        b.mask = torch.cat([b.mask, ones], dim=1)
        out = self.model(
            input_ids=b.last[:, None],
            attention_mask=b.mask,
            position_ids=b.lengths[:, None],
            cache=b.cache,
            use_cache=True,
        )
        b.lengths = b.lengths + 1
        tokens, keep = self._sample(b.seqs, out.logits[:, -1, :])
        b.last = tokens.to(self.device)
        if len(keep) < len(b.seqs):
            self._keep_rows(keep)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Sample one token per row, queue events. logits: (B, vocab) -> (tokens (B,), alive rows)."""
        rows = logits.float().cpu()
        tokens = torch.empty(len(seqs), dtype=torch.long)
        keep = []
        for i, seq in enumerate(seqs):
            if seq.params.max_tokens == 0:  # scoring only: the prompt's logprobs are the answer
                tokens[i] = self._pad_id
                self._finish_unsampled(seq)
                continue
            token, lp = sample_token(rows[i], seq.params, seq.generator, seq.counts)
            tokens[i] = token
            if self._advance(seq, token, lp, vocab=rows.shape[1]):
                keep.append(i)
        return tokens, keep

    @staticmethod
    def _observe(hook: Callable[..., None], *args: Any) -> None:
        """Metrics must never fail a request."""
        try:
            hook(*args)
        except Exception:
            log.warning("engine observer failed", exc_info=True)

    def _close(self, seq: _Seq, outcome: str) -> None:
        """Mark ``seq`` finished and report its cost to the observer."""
        seq.done = True
        if self.observer is not None:
            now = time.monotonic()
            ttft = seq.t_first - seq.t_submit if seq.t_first is not None else None
            stats = RequestStats(
                ttft, now - seq.t_submit, len(seq.prompt_ids), len(seq.generated), outcome
            )
            self._observe(self.observer.request_finished, stats)

    def _finish_unsampled(self, seq: _Seq) -> None:
        """End a ``max_tokens`` 0 sequence after its prefill: one event, no tokens."""
        usage = Usage(len(seq.prompt_ids), 0)
        event = TokenEvent((), "", (), "length", usage, seq.prompt_lps)
        seq.prompt_lps = None
        self._outbox.append((seq, event))
        self._close(seq, "length")

    def _advance(self, seq: _Seq, token: int, lp: TokenLogprob | None, vocab: int) -> bool:
        """Record ``token`` for ``seq`` and queue its event. Returns False when the sequence is done."""
        seq.generated.append(token)
        if seq.t_first is None:
            seq.t_first = time.monotonic()
        self.counters["completion_tokens"] += 1
        if seq.params.has_penalties:
            if seq.counts is None:
                seq.counts = torch.zeros(vocab, dtype=torch.float32)
            seq.counts[token] += 1
        finish = None
        if token in seq.stop_ids:
            finish, text = "stop", seq.detok.flush()
        else:
            text = seq.detok.push(token)
            if seq.detok.stopped:
                finish = "stop"
            elif (
                len(seq.generated) >= seq.params.max_tokens
                or len(seq.prompt_ids) + len(seq.generated) >= self.max_model_len
            ):
                finish = "length"
                text += seq.detok.flush()
        usage = Usage(len(seq.prompt_ids), len(seq.generated)) if finish else None
        lps = (lp,) if lp is not None else ()
        event = TokenEvent((token,), text, lps, finish, usage, seq.prompt_lps)
        seq.prompt_lps = None  # sent once, on the first event
        self._outbox.append((seq, event))
        if finish is not None or seq.cancelled:
            self._close(seq, finish or "cancelled")
            return False
        return True
