"""The OpenAI HTTP layer over the real engine (tiny model) through FastAPI's TestClient, no Ray:
response shapes, SSE framing, every validation case, overload, mid-stream errors, API keys."""

from __future__ import annotations

import contextlib
import json

import pytest
from fastapi.testclient import TestClient

from serving.backend import EngineError, EngineOverloaded, RequestTimeout, TokenEvent
from serving.config import EngineConfig
from serving.engine import Engine
from serving.openai_api import ApiSettings, StaticModels, build_openai_app, load_api_keys
from serving.sampling import SamplingParams

MODEL = "tiny"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(tiny_model_dir, EngineConfig(max_num_seqs=8, default_max_tokens=16))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    app = build_openai_app(StaticModels({MODEL: engine}), ApiSettings(max_body_bytes=8192))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _greedy(engine, ids, n):
    return engine.generate_sync(ids, SamplingParams(max_tokens=n, temperature=0.0))


def _sse(resp):
    """Parse an SSE body into JSON payloads; asserts the framing and the final [DONE]."""
    body = resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    frames = body.split("\n\n")
    assert frames[-1] == "" and frames[-2] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames[:-1])
    return [json.loads(f[6:]) for f in frames[:-2]]


def _assert_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_healthz_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == [MODEL]


def test_completion_matches_engine_greedy_with_exact_usage(client, engine):
    prompt = "Ben was a librarian in"
    r = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ref = _greedy(engine, ids, 12)
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == ref.text
    assert body["choices"][0]["finish_reason"] == ref.finish_reason
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(ref.token_ids),
        "total_tokens": len(ids) + len(ref.token_ids),
    }


def test_chat_uses_the_template_and_stops_at_end_of_turn(client, engine):
    msgs = [{"role": "user", "content": "Where does David live?"}]
    r = client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": msgs, "max_tokens": 10, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    text = engine.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|assistant|>\n")
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    ref = _greedy(engine, ids, 10)
    choice = body["choices"][0]
    assert body["object"] == "chat.completion"
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == len(ref.token_ids)


def test_streamed_completion_equals_non_streamed_and_reports_usage(client):
    req = {"model": MODEL, "prompt": "On Sunday", "max_tokens": 14, "temperature": 0}
    full = client.post("/v1/completions", json=req).json()
    r = client.post(
        "/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}
    )
    chunks = _sse(r)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_streamed_chat_starts_with_role_and_matches(client):
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 9,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    full = client.post("/v1/chat/completions", json=req).json()
    chunks = _sse(client.post("/v1/chat/completions", json={**req, "stream": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    streamed = [
        x for c in chunks[1:] for x in (c["choices"][0]["logprobs"] or {}).get("content", [])
    ]
    assert streamed == full["choices"][0]["logprobs"]["content"] and len(streamed) >= 1
    assert chunks[-1]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert "usage" not in full or full["usage"]["completion_tokens"] >= 1


def test_n_choices_and_seed_are_reproducible(client):
    req = {
        "model": MODEL,
        "prompt": ["a", "The parrot"],
        "n": 2,
        "max_tokens": 8,
        "seed": 5,
        "temperature": 1.0,
    }
    a, b = (client.post("/v1/completions", json=req).json() for _ in range(2))
    assert [c["index"] for c in a["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert a["choices"][0]["text"] != a["choices"][1]["text"]  # choice j samples with seed + j
    assert a["usage"]["completion_tokens"] == 4 * 8


def test_logprobs_shapes(client):
    r = client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "a", "max_tokens": 3, "logprobs": 2, "temperature": 0},
    ).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    # The chosen token and up to 2 alternatives (greedy: the chosen one is the first of them).
    for token, value, top in zip(
        *(lp[k] for k in ("tokens", "token_logprobs", "top_logprobs")), strict=True
    ):
        assert len(top) <= 3 and top[token] == value <= 0 and max(top.values()) == value
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
            "temperature": 0,
        },
    ).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    assert {"token", "logprob", "bytes", "top_logprobs"} <= set(content[0]) and len(
        content[0]["top_logprobs"]
    ) == 2


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]
BAD = [
    ("malformed_json", COMP, b'{"model": "tiny", "prompt": ', 400, None, None),
    ("not_an_object", COMP, b"[1, 2]", 400, None, None),
    ("missing_model", COMP, {"prompt": "x"}, 400, "model", None),
    ("missing_messages", CHAT, {"model": MODEL}, 400, "messages", None),
    ("missing_prompt", COMP, {"model": MODEL}, 400, "prompt", None),
    (
        "max_tokens_as_string",
        COMP,
        {"model": MODEL, "prompt": "x", "max_tokens": "5"},
        400,
        "max_tokens",
        None,
    ),
    (
        "temperature_as_bool",
        COMP,
        {"model": MODEL, "prompt": "x", "temperature": True},
        400,
        "temperature",
        None,
    ),
    (
        "stream_as_string",
        CHAT,
        {"model": MODEL, "messages": MSGS, "stream": "yes"},
        400,
        "stream",
        None,
    ),
    ("messages_not_list", CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages", None),
    ("empty_messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages", None),
    (
        "bad_role",
        CHAT,
        {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages.0.role",
        None,
    ),
    (
        "content_missing",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user"}]},
        400,
        "messages.0.content",
        None,
    ),
    (
        "max_tokens_zero",
        COMP,
        {"model": MODEL, "prompt": "x", "max_tokens": 0},
        400,
        "max_tokens",
        None,
    ),
    (
        "max_completion_tokens_zero",
        CHAT,
        {"model": MODEL, "messages": MSGS, "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
        None,
    ),
    (
        "over_context",
        COMP,
        {"model": MODEL, "prompt": "x", "max_tokens": 256},
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        "prompt_over_context",
        COMP,
        {"model": MODEL, "prompt": "word " * 400},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "chat_over_context",
        CHAT,
        {"model": MODEL, "messages": [{"role": "user", "content": "word " * 400}]},
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        "temperature_high",
        COMP,
        {"model": MODEL, "prompt": "x", "temperature": 2.5},
        400,
        "temperature",
        None,
    ),
    (
        "temperature_negative",
        CHAT,
        {"model": MODEL, "messages": MSGS, "temperature": -1},
        400,
        "temperature",
        None,
    ),
    ("top_p_zero", COMP, {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p", None),
    ("top_p_high", CHAT, {"model": MODEL, "messages": MSGS, "top_p": 1.5}, 400, "top_p", None),
    (
        "penalty_range",
        COMP,
        {"model": MODEL, "prompt": "x", "presence_penalty": 3},
        400,
        "presence_penalty",
        None,
    ),
    ("n_zero", COMP, {"model": MODEL, "prompt": "x", "n": 0}, 400, "n", None),
    ("unknown_model", COMP, {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found"),
    (
        "tools",
        CHAT,
        {
            "model": MODEL,
            "messages": MSGS,
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        400,
        "tools",
        "unsupported_parameter",
    ),
    (
        "response_format",
        CHAT,
        {"model": MODEL, "messages": MSGS, "response_format": {"type": "json_object"}},
        400,
        "response_format",
        "unsupported_parameter",
    ),
    (
        "echo_on_chat",
        CHAT,
        {"model": MODEL, "messages": MSGS, "echo": True},
        400,
        "echo",
        "unsupported_parameter",
    ),
    (
        "prompt_logprobs_streamed",
        COMP,
        {"model": MODEL, "prompt": "x", "prompt_logprobs": 1, "stream": True},
        400,
        "prompt_logprobs",
        None,
    ),
    (
        "prompt_logprobs_range",
        COMP,
        {"model": MODEL, "prompt": "x", "echo": True, "prompt_logprobs": 21},
        400,
        "prompt_logprobs",
        None,
    ),
    (
        "max_tokens_negative_with_echo",
        COMP,
        {"model": MODEL, "prompt": "x", "echo": True, "max_tokens": -1},
        400,
        "max_tokens",
        None,
    ),
    (
        "echo_as_string",
        COMP,
        {"model": MODEL, "prompt": "x", "echo": "true"},
        400,
        "echo",
        None,
    ),
    (
        "echo_over_context",
        COMP,
        {"model": MODEL, "prompt": [1] * 256, "echo": True, "max_tokens": 0, "logprobs": 1},
        400,
        "prompt",
        "context_length_exceeded",
    ),
    (
        "negative_token_id",
        COMP,
        {"model": MODEL, "prompt": [[3, 4], [5, -1]], "echo": True, "max_tokens": 0},
        400,
        "prompt",
        None,
    ),
    (
        "logit_bias",
        COMP,
        {"model": MODEL, "prompt": "x", "logit_bias": {"5": 1}},
        400,
        "logit_bias",
        "unsupported_parameter",
    ),
    (
        "unknown_field",
        COMP,
        {"model": MODEL, "prompt": "x", "frobnicate": 1},
        400,
        "frobnicate",
        "unknown_parameter",
    ),
    (
        "top_logprobs_without_logprobs",
        CHAT,
        {"model": MODEL, "messages": MSGS, "top_logprobs": 2},
        400,
        "top_logprobs",
        None,
    ),
    (
        "top_logprobs_range",
        CHAT,
        {"model": MODEL, "messages": MSGS, "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        None,
    ),
    (
        "completion_logprobs_range",
        COMP,
        {"model": MODEL, "prompt": "x", "logprobs": 21},
        400,
        "logprobs",
        None,
    ),
    ("empty_stop", COMP, {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop", None),
    ("token_id_out_of_range", COMP, {"model": MODEL, "prompt": [1, 999999]}, 400, "prompt", None),
    ("empty_prompt_list", COMP, {"model": MODEL, "prompt": []}, 400, "prompt", None),
    (
        "body_too_large",
        COMP,
        {"model": MODEL, "prompt": "x" * 9000},
        413,
        None,
        "request_too_large",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(client, case):
    _, path, body, status, param, code = case
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    _assert_error(r, status, param, code)


def test_accepted_off_values_of_unsupported_params(client):
    req = {
        "model": MODEL,
        "prompt": "x",
        "max_tokens": 2,
        "echo": False,
        "best_of": 1,
        "logit_bias": {},
    }
    assert client.post(COMP, json=req).status_code == 200
    chat = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 2,
    }
    assert client.post(CHAT, json={**chat, "tools": None}).status_code == 200


def test_unknown_routes_and_methods_are_openai_errors(client):
    _assert_error(client.get("/v1/nope"), 404)
    _assert_error(client.get("/v1/completions"), 405)


class _FakeStream:
    def __init__(self, events, error=None):
        self.events, self.error, self.cancelled = list(events), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.events:
            return self.events.pop(0)
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class _FakeBackend:
    """Backend double for states the tiny engine cannot be put in on demand."""

    max_model_len, default_max_tokens = 256, 8

    def __init__(self, tokenizer, mode, ready=True):
        self.tokenizer, self.mode, self.ready, self.streams = tokenizer, mode, ready, []

    def submit(self, prompt_ids, params):
        if self.mode == "overloaded":
            raise EngineOverloaded("2 running, 64 waiting")
        if self.mode == "timeout":
            s = _FakeStream([], RequestTimeout("request timed out after 1s"))
            self.streams.append(s)
            return s
        s = _FakeStream([TokenEvent((5,), "ab")], EngineError("device lost"))
        self.streams.append(s)
        return s

    def is_ready(self):
        return self.ready

    def stats(self):
        return {}

    def shutdown(self, timeout_s=0.0):
        pass


def _fake_client(engine, mode, ready=True, settings=None):
    backend = _FakeBackend(engine.tokenizer, mode, ready)
    app = build_openai_app(StaticModels({MODEL: backend}), settings)
    return TestClient(app, raise_server_exceptions=False), backend


def test_overload_is_503_with_retry_after(engine):
    c, _ = _fake_client(engine, "overloaded")
    r = c.post(COMP, json={"model": MODEL, "prompt": "x"})
    _assert_error(r, 503, code="overloaded")
    assert r.headers["retry-after"] == "1"


def test_error_after_stream_started_is_an_error_event(engine):
    c, backend = _fake_client(engine, "fails")
    r = c.post(COMP, json={"model": MODEL, "prompt": "x", "stream": True})
    chunks = _sse(r)
    assert chunks[0]["choices"][0]["text"] == "ab"
    assert (
        chunks[-1]["error"]["type"] == "server_error"
        and "device lost" in chunks[-1]["error"]["message"]
    )
    _assert_error(c.post(COMP, json={"model": MODEL, "prompt": "x"}), 500)
    assert all(s.cancelled for s in backend.streams)


def test_healthz_is_503_until_ready(engine):
    c, _ = _fake_client(engine, "ok", ready=False)
    _assert_error(c.get("/healthz"), 503, code="not_ready")


def test_api_keys(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLM_TEST_KEYS", "k-one, k-two")
    keyfile = tmp_path / "keys"
    keyfile.write_text("# ops keys\nk-three\n\n")
    keys = load_api_keys("RAYLM_TEST_KEYS", str(keyfile))
    assert keys == ("k-one", "k-two", "k-three")
    app = build_openai_app(StaticModels({MODEL: engine}), ApiSettings(api_keys=keys))
    c = TestClient(app)
    req = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    _assert_error(c.post(COMP, json=req), 401, code="invalid_api_key")
    _assert_error(c.post(COMP, json=req, headers={"Authorization": "Bearer k-four"}), 401)
    _assert_error(c.get("/v1/models", headers={"Authorization": "k-one"}), 401)
    assert c.post(COMP, json=req, headers={"Authorization": "Bearer k-three"}).status_code == 200
    assert c.get("/v1/models", headers={"Authorization": "Bearer k-one"}).status_code == 200
    assert c.get("/healthz").status_code == 200  # probes need no key
    assert load_api_keys(None, None) == ()


class _EndlessStream(_FakeStream):
    """Yields a token every 10 ms until cancelled, like a long generation."""

    def __init__(self):
        super().__init__([])

    async def __anext__(self):
        import asyncio

        await asyncio.sleep(0.01)
        if self.cancelled:
            raise StopAsyncIteration
        return TokenEvent((5,), "ab")


class _EndlessBackend(_FakeBackend):
    def submit(self, prompt_ids, params):
        self.streams.append(_EndlessStream())
        return self.streams[-1]


def _wait(predicate, timeout_s=10.0):
    import time

    end = time.monotonic() + timeout_s
    while time.monotonic() < end and not predicate():
        time.sleep(0.02)
    return predicate()


@contextlib.contextmanager
def serving(app):
    """``app`` on real uvicorn on a free 127.0.0.1 port, in a thread; yields its ``/v1`` URL."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert _wait(lambda: server.started), "uvicorn did not start"
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_client_disconnect_cancels_generation(engine):
    import httpx

    backend = _EndlessBackend(engine.tokenizer, "ok")
    with serving(build_openai_app(StaticModels({MODEL: backend}))) as base:
        url = f"{base}/completions"
        with httpx.stream("POST", url, json={"model": MODEL, "prompt": "x", "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        assert _wait(lambda: backend.streams[0].cancelled), "stream not cancelled on disconnect"
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json={"model": MODEL, "prompt": "x"}, timeout=0.3)
        assert _wait(lambda: len(backend.streams) == 2 and backend.streams[1].cancelled)


def _post_raw(base, body, headers):
    """POST with Python's own http.client, which reads no answer until it has sent the whole
    body: (status, parsed JSON), or the OSError a connection reset mid-upload raises."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        chunked = not isinstance(body, bytes)
        conn.request("POST", f"{url.path}/completions", body=body, headers=headers,
                     encode_chunked=chunked)  # fmt: skip
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_oversized_body_gets_a_413_the_client_can_read(engine):
    """Bodies 3x and 12x the default limit: the client reads the 413 error object instead of a
    connection reset while it is still sending, whether it declares the length or sends chunks,
    and whether the connection closes after the answer or not. A client that asks for
    "100 Continue" gets the 413 before it sends anything."""
    import socket

    import openai

    limit = ApiSettings().max_body_bytes
    with serving(build_openai_app(StaticModels({MODEL: engine}))) as base:
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=MODEL, prompt="x" * (3 * limit), max_tokens=1)
        assert err.value.status_code == 413
        assert err.value.body["code"] == "request_too_large"
        assert f"larger than {limit} bytes" in err.value.body["message"]

        body = json.dumps({"model": MODEL, "prompt": "x" * (12 * limit)}).encode()
        headers = {"Content-Type": "application/json", "Connection": "close"}
        for content in (body, (body[i : i + 2**16] for i in range(0, len(body), 2**16))):
            status, answer = _post_raw(base, content, headers)
            assert status == 413 and answer["error"]["code"] == "request_too_large"

        host, port = base.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            head = (
                f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Expect: 100-continue\r\n\r\n"
            )
            sock.sendall(head.encode())
            answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 413"), answer[:200]
        assert '"request_too_large"' in answer


def test_request_timeout_is_504_json_or_an_error_event(engine):
    c, _ = _fake_client(engine, "timeout")
    _assert_error(c.post(COMP, json={"model": MODEL, "prompt": "x"}), 504, code="timeout")
    chunks = _sse(c.post(CHAT, json={"model": MODEL, "messages": MSGS, "stream": True}))
    assert chunks[-1]["error"]["code"] == "timeout"


def test_streamed_n_choices_interleave_and_each_equals_its_non_streamed_twin(client):
    req = {"model": MODEL, "prompt": "Ben was", "n": 3, "max_tokens": 6, "seed": 11}
    full = client.post(COMP, json=req).json()
    chunks = _sse(client.post(COMP, json={**req, "stream": True}))
    texts = {i: "" for i in range(3)}
    finishes = {}
    for c in chunks:
        (choice,) = c["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert [texts[i] for i in range(3)] == [ch["text"] for ch in full["choices"]]
    assert finishes == {i: ch["finish_reason"] for i, ch in enumerate(full["choices"])}


def _tokens_per_frame(chunks):
    """Per choice: tokens in each frame, counted by the frame's logprobs (one per token)."""
    out: dict[int, list[int]] = {}
    for c in chunks:
        for ch in c["choices"]:
            out.setdefault(ch["index"], []).append(len(ch["logprobs"]["tokens"]))
    return out


@pytest.mark.parametrize("n", [1, 2])
def test_stream_interval_groups_middle_tokens_only(engine, client, n):
    """Frames carry >= interval tokens, except a choice's first (sent at once) and last."""
    app = build_openai_app(StaticModels({MODEL: engine}), ApiSettings(stream_interval=4))
    req = {"model": MODEL, "prompt": "Ben was a", "max_tokens": 11, "temperature": 0}
    req.update(logprobs=0, ignore_eos=True, n=n)
    full = client.post(COMP, json=req).json()  # the default interval: every token at once
    with TestClient(app, raise_server_exceptions=False) as grouped:
        chunks = _sse(grouped.post(COMP, json={**req, "stream": True}))
    frames = _tokens_per_frame(chunks)
    assert sorted(frames) == list(range(n))
    for i, sizes in frames.items():
        # n: 1 also merges events already queued, so under load its first frame may carry more.
        assert sum(sizes) == 11 and (sizes[0] == 1 or n == 1), sizes
        assert all(s >= 4 for s in sizes[1:-1]) and len(sizes) <= 1 + -(-10 // 4), sizes
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert "".join(ch["text"] for ch in mine) == full["choices"][i]["text"]
        whole = full["choices"][i]["logprobs"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for ch in mine for x in ch["logprobs"][key]] == whole[key], key
    assert all(c["choices"][0]["finish_reason"] == "length" for c in chunks[-n:])


@pytest.mark.parametrize("error", [EngineError("device lost"), None])
def test_stream_interval_sends_held_tokens_when_a_stream_fails_or_ends(engine, error):
    """Tokens held for a frame still reach the client when the stream fails (then the error) or
    ends without a finish reason."""
    events = [TokenEvent((5,), "a"), TokenEvent((6,), "b"), TokenEvent((7,), "c")]

    class Backend(_FakeBackend):
        def submit(self, prompt_ids, params):
            s = _FakeStream(events, error)
            self.streams.append(s)
            return s

    backend = Backend(engine.tokenizer, "fails")
    app = build_openai_app(StaticModels({MODEL: backend}), ApiSettings(stream_interval=8))
    with TestClient(app, raise_server_exceptions=False) as c:
        chunks = _sse(c.post(COMP, json={"model": MODEL, "prompt": "x", "stream": True}))
    texts = [ch["choices"][0]["text"] for ch in chunks if ch.get("choices")]
    assert texts == ["a", "bc"]
    if error is not None:
        assert "device lost" in chunks[-1]["error"]["message"]
    else:
        assert "error" not in chunks[-1]
