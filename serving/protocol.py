"""OpenAI request schemas, validation into engine parameters, and response/chunk builders.

Requests are parsed strictly (no "5" -> 5 coercion, unknown fields rejected) so every bad input becomes
a 400 that names the parameter, as the OpenAI API does.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.backend import TokenEvent, Usage
from serving.sampling import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob

__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "parse_request",
    "sampling_params",
]

# Parameters of the OpenAI API this server does not implement: a 400 naming them, never ignored.
# Values equal to the "off" default (None, False, {}, [], best_of=1) are accepted.
UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "response_format",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "suffix",
    "best_of",
)


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    # UNSUPPORTED parameters that only this request kind refuses.
    unsupported: ClassVar[tuple[str, ...]] = ()

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension: generate exactly max_tokens (benchmarks)
    # Off-by-default OpenAI fields that are accepted only at their "off" value (see UNSUPPORTED).
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 only with echo: score the prompt, generate nothing (as OpenAI's legacy API and vLLM).
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # vLLM extension: each prompt token's logprob, rank and top alternatives per choice.
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None

    def check(self) -> None:
        """What the field types alone cannot say; APIError(400) naming the parameter."""
        if self.max_tokens == 0 and not self.echo:
            raise APIError(
                400,
                "'max_tokens': 0 generates nothing; it scores the prompt with 'echo': true.",
                param="max_tokens",
            )
        if self.prompt_logprobs is not None and self.stream:
            raise APIError(
                400, "'prompt_logprobs' is not available with 'stream': true.",
                param="prompt_logprobs",
            )  # fmt: skip

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """Alternatives per prompt token the engine computes (None: no prompt logprobs at all)."""
        wanted = [self.prompt_logprobs, self.logprobs if self.echo else None]
        ks = [k for k in wanted if k is not None]
        return max(ks) if ks else None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(_Common):
    unsupported: ClassVar[tuple[str, ...]] = ("echo",)  # a completions-only parameter

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


def _is_off(name: str, value: Any) -> bool:
    return value in (None, False, {}, []) or (name == "best_of" and value == 1)


def _loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts union member names in loc (e.g. "str", "list[int]"): keep the request path only.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "TextPart", "StreamOptions"}


def _first_error(err: ValidationError) -> APIError:
    e = err.errors()[0]
    param = _loc(tuple(e["loc"])) or None
    if e["type"] == "extra_forbidden":
        return APIError(
            400,
            f"Unrecognized request argument supplied: {param}",
            param=param,
            code="unknown_parameter",
        )
    if e["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param)
    got = f" (got {e['input']!r})" if not isinstance(e.get("input"), dict | list) else ""
    return APIError(400, f"Invalid value for '{param}': {e['msg']}{got}", param=param)


def parse_request(body: bytes, schema: type[_Common]) -> _Common:
    """Bytes -> validated request, or APIError(400) naming the problem."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    refused = UNSUPPORTED + schema.unsupported
    bad = [k for k in refused if k in data and not _is_off(k, data[k])]
    if bad:
        raise APIError(
            400,
            f"Unsupported parameter(s) for this server: {', '.join(bad)}",
            param=bad[0],
            code="unsupported_parameter",
        )
    for k in refused:  # accepted "off" values are dropped, not stored
        if k in data and k not in schema.model_fields:
            del data[k]
    try:
        # JSON-mode strict validation: ints are valid floats, but "5" is not an int.
        req = schema.model_validate_json(json.dumps(data))
    except ValidationError as err:
        raise _first_error(err) from None
    if isinstance(req, CompletionRequest):
        req.check()
    return req


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if len(items) > 16 or any(not s for s in items):
        raise APIError(400, "'stop' takes up to 16 non-empty strings", param="stop")
    return tuple(items)


def sampling_params(
    req: _Common,
    max_tokens: int,
    logprobs: int | None,
    choice: int,
    stop_token_ids: tuple[int, ...] = (),
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """Engine parameters for choice ``choice`` of ``req`` (seeded choices get seed + choice)."""
    seed = None if req.seed is None else req.seed + choice
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        seed=seed,
        stop=stop_strings(req.stop),
        stop_token_ids=stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def envelope(
    kind: str,
    rid: str,
    model: str,
    choices: list[dict],
    usage: Usage | None,
    null_usage: bool = False,
) -> dict:
    """A response or chunk; ``null_usage``: stream chunks carry ``"usage": null`` (include_usage)."""
    out: dict[str, Any] = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None or null_usage:
        out["usage"] = usage_dict(usage) if usage is not None else None
    return out


def _tok_str(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Any, lps: list[TokenLogprob]) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = _tok_str(tokenizer, tid)
        return {"token": s, "logprob": _lp(lp), "bytes": list(s.encode("utf-8"))}

    return {
        "content": [
            {**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
            for x in lps
        ]
    }


# JSON has no -inf; OpenAI and vLLM send this floor for a token the model rules out.
_MIN_LOGPROB = -9999.0


def _lp(value: float) -> float:
    return max(value, _MIN_LOGPROB)


def completion_logprobs(
    tokenizer: Any,
    entries: Sequence[tuple[int, TokenLogprob | None]],
    offset: int,
    k: int,
) -> dict[str, Any]:
    """The legacy ``logprobs`` object over (token id, logprob or None) entries, in text order.

    ``top_logprobs`` maps token strings to logprobs: the chosen token and up to ``k``
    alternatives (so up to k + 1 entries, as OpenAI's legacy API and vLLM answer). Tokens that
    decode to the same string (byte pieces of one character all read "\ufffd") share one key,
    which keeps the highest logprob, so the largest value is always the model's top choice (what
    lm-evaluation-harness compares the chosen token's logprob with to call it greedy). An entry
    without a logprob (an echoed prompt's first token) gets None in both lists. ``text_offset``
    starts at ``offset`` and advances by each token's string.
    """
    tokens = [_tok_str(tokenizer, tid) for tid, _ in entries]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top: list[dict[str, float] | None] = []
    for (_, x), s in zip(entries, tokens, strict=True):
        if x is None:
            top.append(None)
            continue
        best = {s: _lp(x.logprob)}
        for t, v in x.top[:k]:
            key = _tok_str(tokenizer, t)
            best[key] = max(best.get(key, _MIN_LOGPROB), _lp(v))
        top.append(best)
    return {
        "tokens": tokens,
        "token_logprobs": [None if x is None else _lp(x.logprob) for _, x in entries],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def prompt_entries(
    prompt_ids: list[int], lps: Sequence[TokenLogprob | None] | None
) -> list[tuple[int, TokenLogprob | None]]:
    """An echoed prompt's (token id, logprob) entries; without logprobs, each one None."""
    if lps is None:
        return [(t, None) for t in prompt_ids]
    return list(zip(prompt_ids, lps, strict=True))


def vllm_prompt_logprobs(
    tokenizer: Any, lps: Sequence[TokenLogprob | None], k: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` choice field: per prompt token, None (the first) or
    ``{token id: {logprob, rank, decoded_token}}`` for the prompt token and its top ``k``."""

    def entry(tid: int, lp: float, rank: int | None) -> tuple[str, dict[str, Any]]:
        return str(tid), {
            "logprob": _lp(lp),
            "rank": rank,
            "decoded_token": _tok_str(tokenizer, tid),
        }

    out: list[dict[str, dict[str, Any]] | None] = []
    for x in lps:
        if x is None:
            out.append(None)
            continue
        items = [entry(x.token_id, x.logprob, x.rank)]
        items += [entry(t, v, r) for r, (t, v) in enumerate(x.top[:k], 1) if t != x.token_id]
        out.append(dict(items))
    return out


def sse(data: dict | str) -> str:
    """One server-sent event frame."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


def collect_events(events: list[TokenEvent]) -> tuple[str, list[TokenLogprob], str, Usage]:
    """A finished choice's (text, logprobs, finish_reason, usage) from its events."""
    last = events[-1]
    lps = [lp for ev in events for lp in ev.logprobs]
    text = "".join(ev.text for ev in events)
    usage = last.usage or Usage(0, sum(len(ev.token_ids) for ev in events))
    return text, lps, last.finish_reason or "length", usage
