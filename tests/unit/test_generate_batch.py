"""`raylm generate`'s actor UDF on the tiny model, without Ray: parsed rows -> the engine's
continuous batching -> results equal to `transformers` per row, bad rows as errors naming file:line,
score mode against a plain forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from serving.batch import GenerateBatch, parse_files
from serving.config import GenerateConfig

PROMPTS = ["Ben was a librarian in the town of", "The parrot", "On Sunday the teacher", "a"]
CHAT = [{"role": "user", "content": "Is this review positive or negative?"}]


def _batch(rows: list[dict | str], cfg: GenerateConfig) -> dict[str, np.ndarray]:
    """Rows (dicts, or raw lines) of one jsonl file, parsed as the job's first stage does."""
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    batch = {"path": np.array(["/in.jsonl"], dtype=object),
             "bytes": np.array([text.encode()], dtype=object)}  # fmt: skip
    chunks = list(parse_files(batch, cfg, {"/in.jsonl": ("in.jsonl", 0, "jsonl")}))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _cfg(model_dir, **kw) -> GenerateConfig:
    engine = {"max_num_seqs": 3, "warmup": False, **kw.pop("engine", {})}
    return GenerateConfig(model=str(model_dir), engine=engine, **kw)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    return model, tok


def _greedy(reference, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """transformers' greedy text (specials skipped, as the engine's) and generated token count."""
    model, tok = reference
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids) :].tolist()  # fmt: skip
    text = tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text, len(out)


def _chat_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_greedy_rows_equal_transformers_and_bad_rows_are_errors(tiny_model_dir, reference):
    _, tok = reference
    cfg = _cfg(tiny_model_dir, sampling={"temperature": 0.0, "max_tokens": 12})
    rows = [{"prompt": p, "max_tokens": 8 + i} for i, p in enumerate(PROMPTS)]
    rows += [{"messages": CHAT, "max_tokens": 40}, "{broken", {"prompt": "word " * 300}]
    actor = GenerateBatch(cfg)
    out = actor(_batch(rows, cfg))
    actor.shutdown()
    assert list(out["source"]) == [f"in.jsonl:{i}" for i in range(1, 8)]
    for i, p in enumerate(PROMPTS):
        text, n = _greedy(reference, tok(p, add_special_tokens=False)["input_ids"], 8 + i)
        assert (out["generated_text"][i], out["completion_tokens"][i]) == (text, n), p
        assert out["finish_reason"][i] == "length" and out["error"][i] == ""
        assert out["prompt_tokens"][i] == len(tok(p, add_special_tokens=False)["input_ids"])
    assert len(set(out["generated_text"][: len(PROMPTS)])) == len(PROMPTS), "degenerate model"
    chat_ids = _chat_ids(tok, CHAT)
    text, n = _greedy(reference, chat_ids, 40)
    assert (out["generated_text"][4], out["completion_tokens"][4]) == (text, n)
    assert out["prompt_tokens"][4] == len(chat_ids)
    assert out["error"][5].startswith("in.jsonl:6: malformed JSON")
    n = len(tok("word " * 300, add_special_tokens=False)["input_ids"])
    assert out["error"][6] == f"in.jsonl:7: the prompt has {n} tokens; the model's context is 256"


def test_a_seeded_row_draws_the_same_text_whatever_shares_its_batch(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, sampling={"temperature": 1.0, "max_tokens": 10, "seed": 3})
    actor = GenerateBatch(cfg)
    alone = actor(_batch([{"prompt": PROMPTS[0]}], cfg))
    crowd = actor(_batch([{"prompt": p} for p in PROMPTS[::-1]] + [{"prompt": PROMPTS[0]}], cfg))
    assert crowd["generated_text"][-1] == alone["generated_text"][0]
    other = actor(_batch([{"prompt": PROMPTS[0], "seed": 4}], cfg))
    actor.shutdown()
    assert other["generated_text"][0] != alone["generated_text"][0]


def test_score_sums_the_completion_logprobs_of_a_forward_pass(tiny_model_dir, reference):
    model, tok = reference
    cfg = _cfg(tiny_model_dir, mode="score")
    rows = [{"prompt": "The parrot", "completion": " was happy"},
            {"messages": CHAT, "completion": "positive"},
            {"prompt": "x", "completion": "word " * 300}]  # fmt: skip
    actor = GenerateBatch(cfg)
    out = actor(_batch(rows, cfg))
    actor.shutdown()
    prompt = tok("The parrot", add_special_tokens=False)["input_ids"]
    answer = tok(" was happy", add_special_tokens=False)["input_ids"]
    ids = prompt + answer
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [float(logp[i - 1, ids[i]]) for i in range(len(prompt), len(ids))]
    assert out["completion_token_logprobs"][0] == pytest.approx(want, abs=1e-4)
    assert out["completion_logprob"][0] == pytest.approx(sum(want), abs=1e-4)
    assert (out["prompt_tokens"][0], out["completion_tokens"][0]) == (len(prompt), len(answer))
    # a chat answer is scored with its end-of-turn token, as preference training labels it
    from data_pipelines.tokenize import encode_conversation

    chat_ids, labels = encode_conversation(
        tok, [*CHAT, {"role": "assistant", "content": "positive"}], last_only=True
    )
    assert out["completion_tokens"][1] == int((labels >= 0).sum())
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([chat_ids.tolist()])).logits[0], dim=-1)
    want = sum(float(logp[i - 1, chat_ids[i]]) for i in np.flatnonzero(labels >= 0))
    assert out["completion_logprob"][1] == pytest.approx(want, abs=1e-4)
    assert out["error"][2].startswith("in.jsonl:3: the prompt has ")
    assert out["error"][2].endswith(" tokens; the model's context is 256")


def test_the_vllm_backend_without_vllm_names_the_generate_key(tiny_model_dir):
    from serving.backend import BackendUnavailable

    cfg = _cfg(tiny_model_dir, engine={"backend": "vllm"})
    with pytest.raises(BackendUnavailable, match=r"^generate.engine.backend=vllm needs the `vllm`"):
        GenerateBatch(cfg)
