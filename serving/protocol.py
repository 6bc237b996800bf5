"""OpenAI request schemas, validation into engine parameters, and response/chunk builders.

Requests are parsed strictly (no "5" -> 5 coercion, unknown fields rejected) so every bad input becomes
a 400 that names the parameter, as the OpenAI API does.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.backend import TokenEvent, Usage
from serving.sampling import SamplingParams, TokenLogprob

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
    "echo",
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
    echo: bool = False
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(_Common):
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
    bad = [k for k in UNSUPPORTED if k in data and not _is_off(k, data[k])]
    if bad:
        raise APIError(
            400,
            f"Unsupported parameter(s) for this server: {', '.join(bad)}",
            param=bad[0],
            code="unsupported_parameter",
        )
    for k in UNSUPPORTED:  # accepted "off" values are dropped, not stored
        if k in data and k not in schema.model_fields:
            del data[k]
    try:
        # JSON-mode strict validation: ints are valid floats, but "5" is not an int.
        return schema.model_validate_json(json.dumps(data))
    except ValidationError as err:
        raise _first_error(err) from None


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
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {
        "content": [
            {**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
            for x in lps
        ]
    }


def completion_logprobs(tokenizer: Any, lps: list[TokenLogprob], offset: int) -> dict[str, Any]:
    tokens = [_tok_str(tokenizer, x.token_id) for x in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [x.logprob for x in lps],
        "top_logprobs": [{_tok_str(tokenizer, t): v for t, v in x.top} for x in lps],
        "text_offset": offsets,
    }


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
