"""Real Ray Serve on the session's local Ray, real HTTP on 127.0.0.1, the official `openai` client:
non-streaming and streaming results equal `transformers` greedy generate, errors are OpenAI errors,
API keys are enforced, several models are routed by the request's `model` field, a client that hangs
up through Serve's proxy frees its engine slot, request metrics reach Ray's Prometheus export, and a
vLLM backend where vllm is missing fails the deploy with an error naming the setting. The replica
also answers on its own port (serve.direct_ingress) with the same results and API keys."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import socket
import time

import httpx
import openai
import pytest
import torch

from tests.unit.test_serving_engine import make_lora

pytestmark = pytest.mark.timeout(300)

KEY = "sk-test-raylm"
APP, DEPLOYMENT = "raylm-test", "OpenAIDeployment"
# max_tokens of the requests a client abandons: many seconds of decoding if nothing cancels them.
LONG = 3000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reinit_copy(src, dst, seed):
    """Same architecture and tokenizer as `src`, different random weights."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    shutil.copytree(src, dst)
    base = AutoModelForCausalLM.from_pretrained(str(src), use_safetensors=True)
    torch.manual_seed(seed)
    other = LlamaForCausalLM(base.config)
    other.generation_config = base.generation_config
    other.save_pretrained(str(dst), safe_serialization=True)
    return dst


def _long_context_copy(src, dst, positions=4096):
    """The same model with a longer context (RoPE has no learned table), for requests that would
    decode for many seconds if nothing stopped them."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from serving.config import ServeConfig
    from serving.deployment import start

    tmp = tmp_path_factory.mktemp("serve")
    second = _reinit_copy(tiny_model_dir, tmp / "tiny_b", seed=1)
    lora = make_lora(tiny_model_dir, tmp / "lora")
    long = _long_context_copy(tiny_model_dir, tmp / "tiny_long")
    (tmp / "keys").write_text(f"# test keys\n{KEY}\n")
    cfg = ServeConfig(
        models=[
            {"name": "tiny", "path": str(tiny_model_dir)},
            {"name": "tiny-b", "path": str(second)},
            {"name": "tiny-lora", "path": str(tiny_model_dir), "adapter": str(lora)},
            {"name": "tiny-long", "path": str(long)},
            {"name": "tiny-metrics", "path": str(tiny_model_dir)},  # used by the metrics test only
        ],
        app_name=APP,
        port=_free_port(),
        num_cpus=0.5,
        # 8 slots + 2 waiting per engine: 16 concurrent long requests must overflow (503).
        engine={"torch_threads": 1, "max_num_seqs": 8, "max_waiting": 2, "default_max_tokens": 16},
        autoscaling={"min_replicas": 1, "max_replicas": 1},
        api_keys_file=str(tmp / "keys"),
        max_models_per_replica=2,
        direct_ingress=True,  # the proxy keeps serving `port`; the replica also answers itself
        graceful_shutdown_timeout_s=1,  # teardown: nothing left to finish
    )
    try:
        url = start(cfg)
        yield url, {"tiny": tiny_model_dir, "tiny-b": second, "tiny-lora": (tiny_model_dir, lora)}
    finally:
        serve.shutdown()


def _reference(model_dir, text, n, chat=False):
    """(text, completion_tokens, prompt_tokens) from transformers greedy generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = None
    if isinstance(model_dir, tuple):  # (base dir, LoRA dir)
        model_dir, adapter = model_dir
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    if chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        do_sample=False,
    )
    new = out[0, len(ids) :].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new), len(ids)


def _client(url, key=KEY):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_models_health_and_non_streaming_completion(served):
    url, dirs = served
    client = _client(url)
    names = sorted(m.id for m in client.models.list())
    assert names == ["tiny", "tiny-b", "tiny-long", "tiny-lora", "tiny-metrics"]
    assert httpx.get(url.removesuffix("/v1") + "/healthz", timeout=10).status_code == 200
    prompt = "Ben was a librarian in the town of"
    text, n_out, n_in = _reference(dirs["tiny"], prompt, 12)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_in, n_out)
    # Scoring through the proxy, as lm-eval's local-completions asks: the prompt's own logprobs.
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and len(lp.token_logprobs) == n_in
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert r.usage.completion_tokens == 0


def _direct_url() -> str:
    """The replica's own HTTP address (serve.direct_ingress): Serve allocates ports from 30000."""
    auth = {"Authorization": f"Bearer {KEY}"}
    for port in range(30000, 30064):
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=auth, timeout=2)
        except httpx.HTTPError:
            continue
        if r.status_code == 200 and "tiny-lora" in {m["id"] for m in r.json()["data"]}:
            return f"http://127.0.0.1:{port}/v1"
    pytest.fail("no replica answers on its own port in 30000-30063 (serve.direct_ingress)")


def test_direct_ingress_replica_answers_like_the_proxy(served):
    url, _ = served
    direct = _direct_url()
    assert httpx.get(direct + "/models", timeout=10).status_code == 401  # keys enforced there too
    prompt = "Ana kept a small garden behind"
    via_proxy = _client(url).completions.create(model="tiny", prompt=prompt, max_tokens=10,
                                                temperature=0)  # fmt: skip
    client = _client(direct)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == via_proxy.choices[0].text and r.usage == via_proxy.usage
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                       stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text


def test_streaming_chat_equals_non_streaming_and_generate(served):
    url, dirs = served
    client = _client(url)
    msgs = [{"role": "user", "content": "Where does David live?"}]
    text, n_out, n_in = _reference(dirs["tiny"], msgs[0]["content"], 10, chat=True)
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    assert full.choices[0].message.content == text
    stream = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert deltas == text
    assert chunks[-1].usage.completion_tokens == n_out and chunks[-1].usage.prompt_tokens == n_in
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[
        0
    ].finish_reason


def test_concurrent_requests_over_http_equal_isolated(served):
    url, dirs = served
    prompts = [f"On Sunday {i}" * (1 + i % 3) for i in range(8)]
    refs = [_reference(dirs["tiny"], p, 8)[0] for p in prompts]

    async def run():
        client = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        rs = await asyncio.gather(
            *(
                client.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0)
                for p in prompts
            )
        )
        await client.close()
        return [r.choices[0].text for r in rs]

    assert asyncio.run(run()) == refs


def test_errors_are_openai_errors_over_http(served):
    url, _ = served
    client = _client(url)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    assert err.value.code == "unsupported_parameter" and "tools" in str(err.value)
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        _client(url, key="wrong").models.list()
    raw = httpx.post(
        url + "/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    )
    assert raw.status_code == 400 and set(raw.json()["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }


def test_model_field_routes_between_multiplexed_models_and_lora(served):
    """Three models, an LRU of two per replica: every switch loads or evicts, outputs stay exact."""
    url, dirs = served
    client = _client(url)
    prompt = "The parrot"
    refs = {name: _reference(dirs[name], prompt, 10)[0] for name in dirs}
    assert len(set(refs.values())) == 3, "models too alike: the test would prove nothing"
    for name in ("tiny-b", "tiny-lora", "tiny", "tiny-b", "tiny-lora"):
        r = client.completions.create(
            model=name,
            prompt=prompt,
            max_tokens=10,
            temperature=0,
            extra_headers={"serve_multiplexed_model_id": name},
        )
        assert r.choices[0].text == refs[name], name


def test_overload_is_an_openai_503_with_retry_after_not_serves_plain_one(served):
    url, _ = served
    body = {
        "model": "tiny",
        "prompt": "On Sunday",
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
    }

    async def run():
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(timeout=120, headers=headers) as client:
            return await asyncio.gather(
                *(client.post(url + "/completions", json=body) for _ in range(16))
            )

    responses = asyncio.run(run())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 8 and 503 in codes, codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "overloaded"
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.json()["usage"]["completion_tokens"] == 200


def _engine_stats(model: str) -> dict[str, float]:
    """The replica's engine counters for `model` (zeros while it is not loaded), through a handle."""
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    stats = handle.engine_stats.remote().result(timeout_s=30)
    return stats.get(model, {"running": 0, "waiting": 0, "completion_tokens": 0})


def _poll(fetch, predicate, timeout_s):
    """fetch() until predicate(value) holds or timeout_s passes; returns the last value."""
    end = time.monotonic() + timeout_s
    value = fetch()
    while not predicate(value) and time.monotonic() < end:
        time.sleep(0.2)
        value = fetch()
    return value


def _raw_post(url, path, body):
    """An HTTP/1.1 POST on a bare socket, left open: the test decides when the client hangs up."""
    u = httpx.URL(url + path)
    payload = json.dumps(body).encode()
    head = (
        f"POST {u.raw_path.decode()} HTTP/1.1\r\nHost: {u.host}:{u.port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection((u.host, u.port), timeout=30)
    sock.sendall(head.encode() + payload)
    return sock


@pytest.mark.timeout(180)
def test_client_disconnect_through_serve_cancels_generation_and_frees_the_slot(served):
    """Serve's proxy turns a closed connection into cancellation of the replica's handler; the engine
    must then drop the sequence (streamed and non-streamed) long before its max_tokens."""
    url, _ = served
    body = {"model": "tiny-long", "prompt": "On Sunday", "max_tokens": LONG, "temperature": 0}
    body["ignore_eos"] = True
    running = lambda s: s["running"] + s["waiting"]  # noqa: E731
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60, headers=headers) as client:
        # Streamed: read two chunks, then hang up mid-generation.
        before = _engine_stats("tiny-long")["completion_tokens"]
        with client.stream("POST", url + "/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            chunks = [json.loads(next(lines)[6:]) for _ in range(2)]
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
            assert running(_engine_stats("tiny-long")) == 1, "the stream is not in the batch"
        stats = _poll(lambda: _engine_stats("tiny-long"), lambda s: running(s) == 0, 60)
        assert running(stats) == 0, f"slot still held after the client left: {stats}"
        assert stats["completion_tokens"] - before < LONG, "generation ran to max_tokens"

    # Non-streamed: nothing is sent until the end, so only the closed socket can tell the replica.
    before = _engine_stats("tiny-long")["completion_tokens"]
    sock = _raw_post(url, "/completions", body)
    try:
        stats = _poll(lambda: _engine_stats("tiny-long"), lambda s: running(s) == 1, 60)
        assert running(stats) == 1, "the request never reached the engine"
    finally:
        sock.close()
    stats = _poll(lambda: _engine_stats("tiny-long"), lambda s: running(s) == 0, 60)
    assert running(stats) == 0, f"slot still held after the client left: {stats}"
    assert stats["completion_tokens"] - before < LONG, "generation ran to max_tokens"

    # The freed slots serve the next client.
    r = _client(url).completions.create(model="tiny-long", prompt="x", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("stop", "length")


_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _scrape(port: int, model: str) -> dict[str, float]:
    """Ray's Prometheus export for this node: `name{...outcome}` -> value summed over workers."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or "raylm_" not in m[1]:
            continue
        labels = dict(_LABEL.findall(m[2] or ""))
        if labels.get("model") != model:
            continue
        key = m[1] + (f"{{{labels['outcome']}}}" if "outcome" in labels else "")
        if "le" in labels:
            key += f"[le={labels['le']}]"
        out[key] = out.get(key, 0.0) + float(m[3])
    return out


@pytest.mark.timeout(180)
def test_request_metrics_reach_rays_prometheus_export(served, ray_local):
    """Latency, TTFT, decode tokens/s, tokens and queue depth, scraped from the node's metrics agent
    (replicas push every few seconds, hence the polling), equal to the engine's own counts."""
    url, _ = served
    (node,) = [n for n in ray_local.nodes() if n["Alive"]]
    port, model = node["MetricsExportPort"], "tiny-metrics"
    client = _client(url)
    n_req, n_tok = 3, 6
    for i in range(n_req):
        r = client.completions.create(
            model=model, prompt=f"Sunday {i}", max_tokens=n_tok, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert r.usage.completion_tokens == n_tok
    stats = _engine_stats(model)  # these requests + the load-time warmup, all finished
    assert stats["requests"] == n_req + 1 and stats["completion_tokens"] >= n_req * n_tok

    def exported(m):
        count = sum(v for k, v in m.items() if k.startswith("ray_raylm_request_latency_s_count"))
        return count, m.get("ray_raylm_completion_tokens_total", 0)

    want = (stats["requests"], stats["completion_tokens"])
    m = _poll(lambda: _scrape(port, model), lambda m: exported(m) == want, 90)
    print({k: v for k, v in m.items() if "[le=" not in k})
    assert exported(m) == want, f"exported (requests, tokens) != engine's {want}: {m}"
    assert m["ray_raylm_request_latency_s_count{length}"] >= n_req
    assert m["ray_raylm_ttft_s_count"] == stats["requests"]  # every request made a first token
    assert 0 < m["ray_raylm_ttft_s_sum"] <= m["ray_raylm_request_latency_s_sum{length}"]
    assert m["ray_raylm_decode_tokens_per_s_count"] >= n_req
    assert m["ray_raylm_decode_tokens_per_s_sum"] > 0
    # Queue depth: both gauges exported, and back at 0 once the engine is idle.
    m = _poll(
        lambda: _scrape(port, model),
        lambda m: (
            m.get("ray_raylm_running_sequences") == 0 and m.get("ray_raylm_waiting_sequences") == 0
        ),
        60,
    )
    assert (m.get("ray_raylm_running_sequences"), m.get("ray_raylm_waiting_sequences")) == (0, 0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
@pytest.mark.timeout(240)
def test_vllm_backend_without_vllm_fails_the_deploy_naming_the_setting(served, tiny_model_dir):
    """The replica's error reaches `raylm serve` (not only Serve's logs), which removes its failed
    app and leaves the other apps and Serve itself running."""
    from ray import serve

    from serving.config import ServeConfig
    from serving.deployment import serve_forever

    url, _ = served
    port = int(httpx.URL(url).port)  # the running proxy: a second app joins it
    cfg = ServeConfig(
        models=[{"name": "tiny", "path": str(tiny_model_dir)}],
        app_name="raylm-vllm",
        route_prefix="/vllm",
        port=port,
        num_cpus=0.5,
        engine={"backend": "vllm"},
    )
    try:
        with pytest.raises(RuntimeError, match=r"serve\.engine\.backend=vllm needs the `vllm`"):
            serve_forever(cfg)
        assert "raylm-vllm" not in serve.status().applications
    finally:
        serve.delete("raylm-vllm")
    assert _client(url).models.list().data  # the first app is untouched
