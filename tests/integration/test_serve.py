"""Real Ray Serve on the session's local Ray, real HTTP on 127.0.0.1, the official `openai` client:
non-streaming and streaming results equal `transformers` greedy generate, errors are OpenAI errors,
API keys are enforced, and several models are routed by the request's `model` field."""

from __future__ import annotations

import asyncio
import shutil
import socket

import httpx
import openai
import pytest
import torch

from tests.unit.test_serving_engine import make_lora

pytestmark = pytest.mark.timeout(300)

KEY = "sk-test-raylm"


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


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from serving.config import ServeConfig
    from serving.deployment import start

    tmp = tmp_path_factory.mktemp("serve")
    second = _reinit_copy(tiny_model_dir, tmp / "tiny_b", seed=1)
    lora = make_lora(tiny_model_dir, tmp / "lora")
    (tmp / "keys").write_text(f"# test keys\n{KEY}\n")
    cfg = ServeConfig(
        models=[
            {"name": "tiny", "path": str(tiny_model_dir)},
            {"name": "tiny-b", "path": str(second)},
            {"name": "tiny-lora", "path": str(tiny_model_dir), "adapter": str(lora)},
        ],
        app_name="raylm-test",
        port=_free_port(),
        num_cpus=0.5,
        # 8 slots + 2 waiting per engine: 16 concurrent long requests must overflow (503).
        engine={"torch_threads": 1, "max_num_seqs": 8, "max_waiting": 2, "default_max_tokens": 16},
        autoscaling={"min_replicas": 1, "max_replicas": 1},
        api_keys_file=str(tmp / "keys"),
        max_models_per_replica=2,
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
    assert sorted(m.id for m in client.models.list()) == ["tiny", "tiny-b", "tiny-lora"]
    assert httpx.get(url.removesuffix("/v1") + "/healthz", timeout=10).status_code == 200
    prompt = "Ben was a librarian in the town of"
    text, n_out, n_in = _reference(dirs["tiny"], prompt, 12)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_in, n_out)


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
