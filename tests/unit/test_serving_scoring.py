"""Scoring over /v1/completions, as lm-evaluation-harness and OpenAI's legacy API clients use it:
`echo` with `logprobs` (prompt log-probs), `max_tokens: 0`, every prompt form, vLLM's
`prompt_logprobs`, streamed and not, against an unpadded `transformers` forward. Real engine on the
tiny model, FastAPI's TestClient, no Ray."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from serving.config import EngineConfig
from serving.engine import Engine
from serving.openai_api import StaticModels, build_openai_app

MODEL = "tiny"

COMP = "/v1/completions"
TEXTS = ["Ben was a librarian in the town of", "The parrot", "On Sunday the teacher"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = Engine(tiny_model_dir, EngineConfig(max_num_seqs=8, warmup=False))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(build_openai_app(StaticModels({MODEL: engine}))) as c:
        yield c


def _ids(engine, text):
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def _reference(engine, ids):
    """(len(ids) - 1, vocab) log-softmax of one unpadded forward: row i scores token i + 1."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _post(client, **body):
    r = client.post(COMP, json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _check_echoed_prompt(engine, choice, ids, text, k):
    """The choice starts with the prompt: its text, token strings (offsets from 0), logprobs equal
    to the reference forward (the first None), and the token plus k alternatives in top_logprobs."""
    lp, n = choice["logprobs"], len(ids)
    assert choice["text"].startswith(text)
    assert lp["tokens"][:n] == [engine.tokenizer.decode([t]) for t in ids]
    assert "".join(lp["tokens"][:n]) == text  # offsets index into the returned text
    assert lp["text_offset"][:n] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = _reference(engine, ids)
    for pos in range(1, n):
        row, token = want[pos - 1], ids[pos]
        got = lp["token_logprobs"][pos]
        assert got == pytest.approx(float(row[token]), abs=1e-4)
        top = lp["top_logprobs"][pos]
        best = torch.topk(row, k)
        alternatives = {engine.tokenizer.decode([int(t)]) for t in best.indices}
        assert alternatives | {lp["tokens"][pos]} == set(top)
        # Tokens sharing a string (byte pieces: "\ufffd") keep the best value, so the largest
        # is the model's top choice and equals the chosen token's exactly when it was greedy.
        assert max(top.values()) == pytest.approx(float(best.values[0]), abs=1e-4)
        assert top[lp["tokens"][pos]] >= got
        assert (max(top.values()) == got) == (int(row.argmax()) == token)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_every_prompt_form_prompt_major(client, engine, max_tokens):
    ids = [_ids(engine, t) for t in TEXTS]
    forms = {
        "string": (TEXTS[0], TEXTS[:1], ids[:1]),
        "strings": (TEXTS, TEXTS, ids),
        "token_ids": (ids[1], TEXTS[1:2], ids[1:2]),
        "token_id_lists": (ids, TEXTS, ids),
    }
    for form, (prompt, texts, prompt_ids) in forms.items():
        body = _post(client, prompt=prompt, echo=True, max_tokens=max_tokens, logprobs=2, n=2)
        choices = body["choices"]
        assert [c["index"] for c in choices] == list(range(2 * len(texts))), form
        for c in choices:
            p = c["index"] // 2  # prompt-major: both choices of prompt 0, then prompt 1's
            _check_echoed_prompt(engine, c, prompt_ids[p], texts[p], 2)
            assert len(c["logprobs"]["tokens"]) == len(prompt_ids[p]) + max_tokens
            assert c["finish_reason"] == "length"
        assert body["usage"]["prompt_tokens"] == sum(len(i) for i in prompt_ids)
        assert body["usage"]["completion_tokens"] == 2 * len(texts) * max_tokens


def test_echo_appends_the_generated_tokens_after_the_prompt(client, engine):
    ids = _ids(engine, TEXTS[0])
    plain = _post(client, prompt=TEXTS[0], max_tokens=4, logprobs=1)["choices"][0]
    echoed = _post(client, prompt=TEXTS[0], max_tokens=4, logprobs=1, echo=True)["choices"][0]
    assert echoed["text"] == TEXTS[0] + plain["text"]
    lp, n = echoed["logprobs"], len(ids)
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    # The two requests score the completion in different forward passes: equal up to float
    # rounding (7e-7 seen with the format-3 corpus's tokenizer).
    tol = 1e-5
    assert lp["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=tol)
    tops = zip(lp["top_logprobs"][n:], plain["logprobs"]["top_logprobs"], strict=True)
    assert all(a == pytest.approx(b, abs=tol) for a, b in tops)
    # Offsets count from the start of the prompt; without echo, from the completion's start.
    assert [o - len(TEXTS[0]) for o in lp["text_offset"][n:]] == plain["logprobs"]["text_offset"]


def test_echo_without_logprobs_returns_the_prompt_and_runs_nothing(client, engine):
    before = engine.stats()["requests"]
    body = _post(client, prompt=["a b", "The parrot"], echo=True, max_tokens=0)
    assert [c["text"] for c in body["choices"]] == ["a b", "The parrot"]
    assert all(c["logprobs"] is None and c["finish_reason"] == "length" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 0
    streamed = client.post(COMP, json={"model": MODEL, "prompt": "a b", "echo": True,
                                       "max_tokens": 0, "stream": True})  # fmt: skip
    frames = [json.loads(f[6:]) for f in streamed.text.split("\n\n") if f.startswith("data: {")]
    assert [f["choices"][0]["text"] for f in frames] == ["a b"]
    assert frames[0]["choices"][0]["finish_reason"] == "length"
    assert engine.stats()["requests"] == before
    # A token prompt is echoed as its decoded text, special tokens kept.
    bos = engine.tokenizer.bos_token_id
    ids = [bos, *_ids(engine, "The parrot")]
    (c,) = _post(client, prompt=ids, echo=True, max_tokens=0)["choices"]
    assert c["text"] == engine.tokenizer.bos_token + "The parrot"


@pytest.mark.parametrize("max_tokens", [0, 5])
def test_streamed_echo_equals_the_non_streamed_answer(client, max_tokens):
    req = {"prompt": [TEXTS[1], TEXTS[2]], "echo": True, "max_tokens": max_tokens, "logprobs": 1}
    full = _post(client, **req)
    r = client.post(COMP, json={"model": MODEL, "temperature": 0, "stream": True, **req})
    frames = [json.loads(f[6:]) for f in r.text.split("\n\n") if f and f != "data: [DONE]"]
    for want in full["choices"]:
        mine = [f["choices"][0] for f in frames if f["choices"][0]["index"] == want["index"]]
        assert "".join(c["text"] for c in mine) == want["text"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for c in mine for x in c["logprobs"][key]] == want["logprobs"][key], key
        assert mine[-1]["finish_reason"] == want["finish_reason"]


def test_vllm_prompt_logprobs_with_ranks(client, engine):
    ids = _ids(engine, TEXTS[2])
    (c,) = _post(client, prompt=ids, max_tokens=2, prompt_logprobs=3)["choices"]
    assert c["logprobs"] is None and not c["text"].startswith(TEXTS[2])  # no echo asked
    plp = c["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    want = _reference(engine, ids)
    for pos in range(1, len(ids)):
        row, token = want[pos - 1], ids[pos]
        entry = plp[pos][str(token)]
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert entry["rank"] == int((row > row[token]).sum()) + 1
        assert entry["decoded_token"] == engine.tokenizer.decode([token])
        best = torch.topk(row, 3).indices.tolist()
        assert set(plp[pos]) == {str(t) for t in best} | {str(token)}
        assert [plp[pos][str(t)]["rank"] for t in best] == [1, 2, 3]


def test_plain_requests_never_compute_prompt_logits(engine):
    """The lm_head sees one position per row of a plain prefill; a scoring request (echo,
    max_tokens 0) is one forward over its whole prompt, and nothing else runs for it."""
    head = engine.model.get_output_embeddings()
    seen: list[tuple[int, ...]] = []
    hook = head.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape[:2])))
    app = build_openai_app(StaticModels({MODEL: engine}))
    ids = _ids(engine, TEXTS[0])
    try:
        with TestClient(app) as c:
            _post(c, prompt=ids, max_tokens=1)
            assert seen == [(1, 1)]
            seen.clear()
            _post(c, prompt=ids, max_tokens=0, echo=True, logprobs=1)
            assert seen == [(1, len(ids))]
    finally:
        hook.remove()
