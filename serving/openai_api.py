"""The OpenAI-compatible HTTP layer: a FastAPI app factory over one or more backends.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON or SSE with
``stream: true``), ``GET /healthz``. Every failure is an OpenAI error object; bad input is a 4xx,
overload a 503 with ``Retry-After``, and an error after a stream started is sent as an error event.
Bodies are parsed by hand (not by FastAPI) so malformed JSON and wrong types never become a 422.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from data_pipelines.chat import end_of_turn_ids
from serving.backend import (
    Backend,
    EngineOverloaded,
    EngineShutdown,
    GenerationStream,
    RequestTimeout,
    TokenEvent,
    Usage,
    merge_events,
)
from serving.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_logprobs,
    collect_events,
    completion_logprobs,
    envelope,
    new_id,
    parse_request,
    prompt_entries,
    sampling_params,
    sse,
    vllm_prompt_logprobs,
)
from serving.sampling import SamplingParams

__all__ = ["ApiSettings", "ModelProvider", "StaticModels", "build_openai_app", "load_api_keys"]

log = logging.getLogger("raylm.serving.api")


class ModelProvider(Protocol):
    """Names the served models and hands out a ready backend for one of them."""

    def model_names(self) -> list[str]: ...

    async def get(self, name: str) -> Backend: ...

    def is_ready(self) -> bool: ...


class StaticModels:
    """Backends already loaded in this process, by name."""

    def __init__(self, backends: dict[str, Backend]) -> None:
        self._backends = dict(backends)

    def model_names(self) -> list[str]:
        return list(self._backends)

    async def get(self, name: str) -> Backend:
        return self._backends[name]

    def is_ready(self) -> bool:
        return bool(self._backends) and all(b.is_ready() for b in self._backends.values())


@dataclass(frozen=True)
class ApiSettings:
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1_000_000
    retry_after_s: int = 1
    # Tokens per streamed frame after a choice's first visible one (``serve.stream_interval``).
    stream_interval: int = 1


def load_api_keys(env_var: str | None, file: str | None) -> tuple[str, ...]:
    """Keys from a comma-separated env var and/or a file (one per line, ``#`` comments)."""
    keys: list[str] = []
    if env_var and os.environ.get(env_var):
        keys += [k.strip() for k in os.environ[env_var].split(",")]
    if file:
        for line in Path(file).read_text(encoding="utf-8").splitlines():
            keys.append(line.split("#", 1)[0].strip())
    return tuple(k for k in keys if k)


def _key_ok(header: str | None, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every key (no early exit on the first match)."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    # Compare fixed-length digests so neither the key nor its length leaks through timing.
    given = hashlib.sha256(token.strip().encode()).digest()
    ok = False
    for k in keys:
        ok |= hmac.compare_digest(given, hashlib.sha256(k.encode()).digest())
    return ok


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(APIError(400, f"Invalid request: {exc.errors()[:1]}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, "Internal server error.", type="server_error"))


# An oversized body is still read (and dropped) up to this many bytes before the 413 goes out: a
# server that answers and closes while the client is still sending resets the connection, and the
# client sees "connection reset" instead of the error. Past this, the client is cut off.
_DRAIN_BYTES = 64 * 2**20


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 once it passes ``limit`` bytes (after draining the rest)."""
    too_big = APIError(413, f"Request body larger than {limit} bytes.", code="request_too_large")
    length = request.headers.get("content-length", "")
    declared = int(length) if length.isdigit() else None
    if declared is not None and declared > limit:
        # A client waiting for "100 Continue" has sent nothing yet: answer without reading.
        waiting = request.headers.get("expect", "").lower() == "100-continue"
        if waiting or declared > _DRAIN_BYTES:
            raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DRAIN_BYTES:
            break
    if size > limit:
        raise too_big
    return b"".join(chunks)


def _authorize(request: Request, settings: ApiSettings) -> None:
    if settings.api_keys and not _key_ok(request.headers.get("authorization"), settings.api_keys):
        raise APIError(
            401,
            "Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _backend_for(provider: ModelProvider, name: str) -> Backend:
    if name not in provider.model_names():
        raise APIError(
            404,
            f"The model '{name}' does not exist; served: {', '.join(provider.model_names())}.",
            param="model",
            code="model_not_found",
        )
    return await provider.get(name)


def _budget(backend: Backend, prompt_len: int, requested: int | None, prompt_param: str) -> int:
    """max_tokens for one prompt: the request's, else the default capped by the context."""
    ctx = backend.max_model_len
    if prompt_len >= ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens; the prompt has {prompt_len}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return min(backend.default_max_tokens, ctx - prompt_len)
    if prompt_len + requested > ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {ctx} tokens; the prompt has {prompt_len} "
            f"and max_tokens asks for {requested} more.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


def _completion_prompts(tokenizer: Any, prompt: Any) -> list[list[int]]:
    """str | list[str] | list[int] | list[list[int]] -> token id lists (each non-empty)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "'prompt' must not be empty.", param="prompt")
    vocab = len(tokenizer)
    out = []
    for p in prompt:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else p
        if not ids and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id]  # an empty prompt conditions on the start token
        if not ids or any(not 0 <= t < vocab for t in ids):
            raise APIError(
                400, f"'prompt' must be non-empty with token ids in [0, {vocab}).", param="prompt"
            )
        out.append(list(ids))
    return out


def _chat_prompt(tokenizer: Any, req: ChatRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400, "This model has no chat template; use /v1/completions.", param="messages"
        )
    msgs = [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.content
            if isinstance(m.content, str)
            else "".join(p.text for p in m.content),
        }
        for m in req.messages
    ]
    try:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template may reject a role order; that is the request's fault
        raise APIError(
            400, f"The chat template rejected the messages: {exc}", param="messages"
        ) from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _submit_all(
    backend: Backend, jobs: list[tuple[list[int], SamplingParams | None]], settings: ApiSettings
) -> list[GenerationStream]:
    """Submit every (prompt ids, SamplingParams); all or nothing, so overload rejects the request.

    A job without parameters (a prompt-only echo) runs nothing: its stream just ends."""
    streams: list[GenerationStream] = []
    try:
        for ids, params in jobs:
            streams.append(
                backend.submit(ids, params) if params is not None else _PromptOnly(len(ids))
            )
    except BaseException as exc:
        for s in streams:
            s.cancel()
        if isinstance(exc, EngineOverloaded | EngineShutdown):
            raise APIError(
                503,
                f"The server is overloaded; retry shortly. ({exc})",
                type="server_error",
                code="overloaded",
                headers={"Retry-After": str(settings.retry_after_s)},
            ) from None
        if isinstance(exc, ValueError):
            raise APIError(400, str(exc), param="prompt") from None
        raise
    return streams


def _engine_error(exc: Exception) -> APIError:
    if isinstance(exc, RequestTimeout):
        return APIError(504, str(exc), type="timeout_error", code="timeout")
    if isinstance(exc, EngineShutdown):
        return APIError(503, str(exc), type="server_error", code="shutting_down")
    if isinstance(exc, APIError):
        return exc
    log.error("generation failed: %r", exc)
    return APIError(500, f"Generation failed: {exc}", type="server_error")


async def _drain_all(request: Request, streams: list[GenerationStream]) -> list[list[TokenEvent]]:
    """Every stream's events; a client that goes away cancels them (frees engine slots)."""

    async def drain(s: GenerationStream) -> list[TokenEvent]:
        return [ev async for ev in s]

    task = asyncio.ensure_future(asyncio.gather(*(drain(s) for s in streams)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client disconnected", code="client_closed_request")
    except (APIError, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise _engine_error(exc) from None
    finally:
        task.cancel()
        for s in streams:
            s.cancel()


class _Frames:
    """Groups a choice's events into frames of at least ``interval`` tokens, without a timer.

    A choice's first visible event (text or logprobs) and its last one are never held back, so time
    to first token and end-to-end latency do not change; only the tokens in between travel in fewer,
    larger frames, which is what each frame's per-hop cost (proxy, ASGI, client parse) is paid on.
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._held: dict[int, list[TokenEvent]] = {}
        self._shown: set[int] = set()  # choices whose first visible frame went out

    def add(self, i: int, events: list[TokenEvent]) -> TokenEvent | None:
        held = self._held.setdefault(i, [])
        held += events
        visible = any(ev.text or ev.logprobs for ev in held)
        if (
            held[-1].finish_reason is None
            and (i in self._shown or not visible)
            and sum(len(ev.token_ids) for ev in held) < self.interval
        ):
            return None
        if visible:
            self._shown.add(i)
        del self._held[i]
        return merge_events(held)

    def rest(self, only: int | None = None) -> list[tuple[int, TokenEvent]]:
        """What is still held (a stream that failed or ended mid-frame), by choice index."""
        held = sorted(i for i in self._held if only is None or i == only)
        return [(i, merge_events(self._held.pop(i))) for i in held]


async def _merge(
    streams: list[GenerationStream], interval: int = 1
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) in arrival order across streams; the first error is raised.

    Events already queued are coalesced into one frame (no timer: a consumer slower than the engine
    sends fewer, larger frames), and ``interval`` > 1 holds a choice's middle tokens until that many
    are ready (:class:`_Frames`). Tokens held when a stream fails are sent before the error.
    """
    frames = _Frames(interval)
    if len(streams) == 1:
        ready = getattr(streams[0], "ready", None)
        try:
            async for ev in streams[0]:
                out = frames.add(0, [ev, *ready()] if ready is not None else [ev])
                if out is not None:
                    yield 0, out
        except Exception:
            for item in frames.rest():
                yield item
            raise
        for item in frames.rest():  # a stream that ended without a finish reason
            yield item
        return
    q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, s: GenerationStream) -> None:
        try:
            async for ev in s:
                q.put_nowait((i, ev))
        except Exception as exc:
            q.put_nowait((i, exc))
        q.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
                for held in frames.rest(i):
                    yield held
            elif isinstance(item, BaseException):
                for held in frames.rest():
                    yield held
                raise item
            else:
                out = frames.add(i, [item])
                if out is not None:
                    yield i, out
    finally:
        for t in tasks:
            t.cancel()


async def _sse_events(
    streams: list[GenerationStream],
    preamble: list[dict],
    chunk: Callable[[int, TokenEvent], dict | None],
    usage_chunk: Callable[[int], dict] | None,
    interval: int = 1,
) -> AsyncIterator[str]:
    """SSE frames: preamble, one chunk per event, optional usage chunk, ``[DONE]``.

    An engine error mid-stream becomes an error event followed by ``[DONE]``; a client disconnect
    closes this generator, which cancels the streams.
    """
    completion_tokens = 0
    try:
        for p in preamble:
            yield sse(p)
        async for i, ev in _merge(streams, interval):
            if ev.usage is not None:
                completion_tokens += ev.usage.completion_tokens
            frame = chunk(i, ev)
            if frame is not None:
                yield sse(frame)
        if usage_chunk is not None:
            yield sse(usage_chunk(completion_tokens))
        yield sse("[DONE]")
    except Exception as exc:
        yield sse(_engine_error(exc).body())
        yield sse("[DONE]")
    finally:
        for s in streams:
            s.cancel()


def _streaming_response(frames: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        frames,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _PromptOnly:
    """The stream of a choice that only echoes its prompt (``max_tokens`` 0, no logprobs): it has
    nothing to run, so it never reaches the backend."""

    def __init__(self, prompt_len: int) -> None:
        self._event: TokenEvent | None = TokenEvent((), "", (), "length", Usage(prompt_len, 0))

    def __aiter__(self) -> _PromptOnly:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._event is None:
            raise StopAsyncIteration
        event, self._event = self._event, None
        return event

    def cancel(self) -> None:
        self._event = None


class _CompletionChoices:
    """Builds ``/v1/completions`` choices from their events: echo, logprobs and prompt logprobs.

    Choices are prompt-major (choice ``i`` answers prompt ``i // n``), as OpenAI orders them. With
    ``echo`` a choice's text, tokens and logprobs start with its prompt's, offsets from the start
    of the prompt; streamed, the prompt goes out with the choice's first frame.
    """

    def __init__(self, req: CompletionRequest, tokenizer: Any, prompts: list[list[int]]) -> None:
        self.req, self.tok, self.prompts = req, tokenizer, prompts
        self.texts = _prompt_texts(tokenizer, req.prompt, prompts) if req.echo else []
        self._offsets: dict[int, int] = {}  # streamed: text offset of each choice's next token

    def jobs(self, backend: Backend) -> list[tuple[list[int], SamplingParams | None]]:
        """(prompt ids, engine parameters or None for a prompt-only echo) per choice."""
        req, k = self.req, self.req.engine_prompt_logprobs
        out: list[tuple[list[int], SamplingParams | None]] = []
        for ids in self.prompts:
            max_tokens = _budget(backend, len(ids), req.max_tokens, "prompt")
            for j in range(req.n):
                if max_tokens == 0 and k is None:
                    out.append((ids, None))  # the prompt echoed alone: nothing to run
                else:
                    out.append((ids, sampling_params(req, max_tokens, req.logprobs, j, (), k)))
        return out

    def _logprobs(self, i: int, ev: TokenEvent, echo: bool, offset: int) -> dict | None:
        if self.req.logprobs is None:
            return None
        entries = [(x.token_id, x) for x in ev.logprobs]
        if echo:
            prompt = prompt_entries(self.prompts[i // self.req.n], ev.prompt_logprobs)
            entries = prompt + entries
        return completion_logprobs(self.tok, entries, offset, self.req.logprobs)

    def choice(self, i: int, events: list[TokenEvent]) -> tuple[dict, Usage]:
        """A finished choice (non-streamed) and its usage."""
        ev = merge_events(events)
        text, finish = ev.text, ev.finish_reason or "length"
        usage = ev.usage or Usage(0, len(ev.token_ids))
        if self.req.echo:
            text = self.texts[i // self.req.n] + text
        lp = self._logprobs(i, ev, self.req.echo, 0)
        choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
        if self.req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(
                self.tok, ev.prompt_logprobs or (), self.req.prompt_logprobs
            )
        return choice, usage

    def chunk(self, i: int, ev: TokenEvent) -> dict | None:
        """The streamed choice of one frame (None: nothing to send yet)."""
        echo = self.req.echo and i not in self._offsets
        if not echo and not ev.text and ev.finish_reason is None and not ev.logprobs:
            return None
        text = (self.texts[i // self.req.n] if echo else "") + ev.text
        # Offsets advance by token strings, as in the non-streamed answer, so they do not depend
        # on how tokens were grouped into frames.
        lp = self._logprobs(i, ev, echo, self._offsets.get(i, 0))
        if lp is not None:
            self._offsets[i] = self._offsets.get(i, 0) + sum(len(t) for t in lp["tokens"])
        else:
            self._offsets.setdefault(i, 0)
        return {"index": i, "text": text, "logprobs": lp, "finish_reason": ev.finish_reason}


def _prompt_texts(tokenizer: Any, prompt: Any, prompts: list[list[int]]) -> list[str]:
    """Echoed prompt texts: a text prompt as sent, a token prompt decoded (specials kept)."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], str):
        return list(prompt)
    return [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]


async def _completions(
    request: Request, req: CompletionRequest, provider: ModelProvider, settings: ApiSettings
) -> Any:
    backend = await _backend_for(provider, req.model)
    choices = _CompletionChoices(
        req, backend.tokenizer, _completion_prompts(backend.tokenizer, req.prompt)
    )
    streams = _submit_all(backend, choices.jobs(backend), settings)
    rid, prompt_tokens = new_id("cmpl"), sum(len(p) for p in choices.prompts)
    if req.stream:

        def chunk(i: int, ev: TokenEvent) -> dict | None:
            c = choices.chunk(i, ev)
            if c is None:
                return None
            return envelope("text_completion", rid, req.model, [c], None, _wants_usage(req))

        usage_chunk = _usage_chunk("text_completion", rid, req, prompt_tokens)
        frames = _sse_events(streams, [], chunk, usage_chunk, settings.stream_interval)
        return _streaming_response(frames)
    results = await _drain_all(request, streams)
    out, completion_tokens = [], 0
    for i, events in enumerate(results):
        choice, usage = choices.choice(i, events)
        completion_tokens += usage.completion_tokens
        out.append(choice)
    return _json_result("text_completion", rid, req.model, out, prompt_tokens, completion_tokens)


def _wants_usage(req: Any) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _usage_chunk(kind: str, rid: str, req: Any, prompt_tokens: int) -> Callable[[int], dict] | None:
    if not _wants_usage(req):
        return None
    return lambda completion: envelope(kind, rid, req.model, [], Usage(prompt_tokens, completion))


def _json_result(
    kind: str, rid: str, model: str, choices: list[dict], prompt_tokens: int, completion: int
) -> JSONResponse:
    return JSONResponse(envelope(kind, rid, model, choices, Usage(prompt_tokens, completion)))


async def _chat(
    request: Request, req: ChatRequest, provider: ModelProvider, settings: ApiSettings
) -> Any:
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "'top_logprobs' requires 'logprobs': true.", param="top_logprobs")
    backend = await _backend_for(provider, req.model)
    tok = backend.tokenizer
    ids = _chat_prompt(tok, req)
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    max_tokens = _budget(backend, len(ids), requested, "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    stop_ids = () if req.ignore_eos else end_of_turn_ids(tok)
    jobs = [(ids, sampling_params(req, max_tokens, k, j, stop_ids)) for j in range(req.n)]
    streams = _submit_all(backend, jobs, settings)
    rid = new_id("chatcmpl")
    kind = "chat.completion.chunk"
    if req.stream:

        def chunk(i: int, ev: TokenEvent) -> dict | None:
            if not ev.text and ev.finish_reason is None and not ev.logprobs:
                return None
            lp = chat_logprobs(tok, list(ev.logprobs)) if k is not None else None
            delta = {"content": ev.text} if ev.text else {}
            c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
            return envelope(kind, rid, req.model, [c], None, _wants_usage(req))

        role = {"role": "assistant", "content": ""}
        preamble = [
            envelope(
                kind,
                rid,
                req.model,
                [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}],
                None,
                _wants_usage(req),
            )
            for i in range(len(streams))
        ]
        usage_chunk = _usage_chunk(kind, rid, req, len(ids))
        frames = _sse_events(streams, preamble, chunk, usage_chunk, settings.stream_interval)
        return _streaming_response(frames)
    results = await _drain_all(request, streams)
    choices, completion_tokens = [], 0
    for i, events in enumerate(results):
        text, lps, finish, usage = collect_events(events)
        completion_tokens += usage.completion_tokens
        lp = chat_logprobs(tok, lps) if k is not None else None
        message = {"role": "assistant", "content": text}
        choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
    return _json_result("chat.completion", rid, req.model, choices, len(ids), completion_tokens)


def build_openai_app(
    provider: ModelProvider,
    settings: ApiSettings | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``provider``'s models (no Ray needed)."""
    settings = settings or ApiSettings()
    app = FastAPI(title="raylm", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        if not provider.is_ready():
            raise APIError(503, "The model is loading.", type="server_error", code="not_ready")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, settings)
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "raylm"}
            for n in provider.model_names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        _authorize(request, settings)
        body = await _read_body(request, settings.max_body_bytes)
        req = parse_request(body, CompletionRequest)
        return await _completions(request, req, provider, settings)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        _authorize(request, settings)
        body = await _read_body(request, settings.max_body_bytes)
        req = parse_request(body, ChatRequest)
        return await _chat(request, req, provider, settings)

    return app
