"""lm-evaluation-harness itself on the tiny model, against raylm: the same local tasks (a
multiple-choice one scored by loglikelihood, a generation one) run with lm-eval's `hf` model in this
process and with its `local-completions` / `local-chat-completions` models over real HTTP against
raylm's OpenAI app (uvicorn on 127.0.0.1, the built-in engine). Per sample, loglikelihoods agree to
1e-3, greedy flags and generations are equal. `raylm eval` runs the tasks both ways (in-process and
on the endpoint) into eval.json, its table and --compare."""

from __future__ import annotations

import json

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

from cluster.cli import main
from serving.config import EngineConfig
from serving.engine import Engine
from serving.openai_api import StaticModels, build_openai_app
from tests.unit.test_serving_http import serving

pytestmark = pytest.mark.timeout(600)

MODEL = "tiny"
QUESTIONS = [
    "Ben was a librarian in the town of",
    "Nothing made Ben happier than",
    "Every red ball",
    "Where does David live?",
    "On Sunday the teacher",
    "The small red",
]
OTHER_CHOICES = [" a small house", " the red ball", "?", " behind every teacher"]
GEN_PROMPTS = ["Ben was a librarian in", "On Sunday the", "The parrot", "Where does David live?"]
MC_YAML = """task: raylm_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_YAML = """task: raylm_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _greedy_choice(model, tok, question: str) -> str | None:
    """The model's own greedy continuation (2 tokens, else 1) whose text tokenizes back to those
    tokens after the question, so lm-eval must call it greedy on both sides; None if neither does
    (the random tiny model writes many byte pieces)."""
    ids = tok(question, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False)
    for n in (2, 1):
        new = out[0, len(ids) : len(ids) + n].tolist()
        text = tok.decode(new)
        if tok(question + text, add_special_tokens=False)["input_ids"] == ids + new:
            return text
    return None


@pytest.fixture(scope="module")
def task_dir(tiny_model_dir, tmp_path_factory):
    """Task YAMLs + jsonl data. Each multiple-choice doc holds the model's greedy continuation
    among its choices (where it round-trips through the tokenizer), so greedy flags are tested."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), use_safetensors=True).eval()
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    docs = []
    greedy_choices = [_greedy_choice(model, tok, q) for q in QUESTIONS]
    for i, (q, greedy) in enumerate(zip(QUESTIONS, greedy_choices, strict=True)):
        choices = list(OTHER_CHOICES)
        if greedy is not None:
            choices[i % 4] = greedy
        docs.append({"question": q, "choices": choices, "label": (i * 3) % 4})
    assert sum(c is not None for c in greedy_choices) >= 2, "no greedy flag would be compared"
    gen = [{"question": q, "answer": "x"} for q in GEN_PROMPTS]
    for name, rows, yaml in (("mc", docs, MC_YAML), ("gen", gen, GEN_YAML)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / f"raylm_{name}.yaml").write_text(yaml.format(data=out / f"{name}.jsonl"))
    return out


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir):
    """raylm's OpenAI app over the built-in engine, on real uvicorn; yields the /v1 URL."""
    engine = Engine(tiny_model_dir, EngineConfig(max_num_seqs=8, warmup=False))
    try:
        with serving(build_openai_app(StaticModels({MODEL: engine}))) as base:
            yield base
    finally:
        engine.shutdown()


def _evaluate(task_dir, model, model_args, tasks, **kw):
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks,
                                  task_manager=tm, log_samples=True, bootstrap_iters=0, **kw)  # fmt: skip
    return {task: sorted(s, key=lambda x: x["doc_id"]) for task, s in out["samples"].items()}


@pytest.fixture(scope="module")
def in_process(tiny_model_dir, task_dir):
    args = {"pretrained": str(tiny_model_dir), "dtype": "float32"}
    return _evaluate(task_dir, "hf", args, ["raylm_mc", "raylm_gen"], batch_size=4, device="cpu")


def _api_args(base, route, tiny_model_dir):
    return {"model": MODEL, "base_url": f"{base}/{route}", "tokenizer_backend": "huggingface",
            "tokenizer": str(tiny_model_dir), "max_length": 256, "num_concurrent": 2}  # fmt: skip


def test_loglikelihoods_and_generations_over_http_equal_lm_evals_hf_model(
    in_process, endpoint, task_dir, tiny_model_dir
):
    args = {**_api_args(endpoint, "completions", tiny_model_dir), "batch_size": 4}
    remote = _evaluate(task_dir, "local-completions", args, ["raylm_mc", "raylm_gen"])
    mc_local, mc_remote = in_process["raylm_mc"], remote["raylm_mc"]
    assert len(mc_local) == len(mc_remote) == len(QUESTIONS)
    greedy_seen = 0
    for a, b in zip(mc_local, mc_remote, strict=True):
        for (ll_a, greedy_a), (ll_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"],
                                                      strict=True):  # fmt: skip
            assert ll_b == pytest.approx(ll_a, abs=1e-3), a["doc_id"]
            assert greedy_b == greedy_a, a["doc_id"]
            greedy_seen += greedy_a
        assert a["acc"] == b["acc"]
    assert greedy_seen >= 2, "no greedy choice: the greedy flags were not compared"
    gen_local, gen_remote = in_process["raylm_gen"], remote["raylm_gen"]
    texts = [s["filtered_resps"] for s in gen_local]
    assert texts == [s["filtered_resps"] for s in gen_remote]
    assert len({t[0] for t in texts}) == len(GEN_PROMPTS), "degenerate generations prove nothing"


def test_chat_generations_over_http_equal_lm_evals_hf_model_with_the_template(
    endpoint, task_dir, tiny_model_dir
):
    hf = {"pretrained": str(tiny_model_dir), "dtype": "float32"}
    local = _evaluate(task_dir, "hf", hf, ["raylm_gen"], batch_size=4, device="cpu",
                      apply_chat_template=True)  # fmt: skip
    args = {"model": MODEL, "base_url": f"{endpoint}/chat/completions", "num_concurrent": 2}
    remote = _evaluate(task_dir, "local-chat-completions", args, ["raylm_gen"],
                       apply_chat_template=True)  # fmt: skip
    for a, b in zip(local["raylm_gen"], remote["raylm_gen"], strict=True):
        assert a["arguments"][0][0].endswith("<|assistant|>\n")  # the template was applied
        assert b["filtered_resps"] == a["filtered_resps"], a["doc_id"]


def _eval_config(tmp_path, name, tiny_model_dir, task_dir, extra=""):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"name: {name}\neval:\n  model: {tiny_model_dir}\n"
        f"  harness_tasks: [raylm_mc, raylm_gen]\n  harness_include_path: [{task_dir}]\n"
        f"  harness_limit: 4\n  batch_size: 4\n  output: {tmp_path / name}\n{extra}"
    )
    return cfg


def test_raylm_eval_runs_harness_tasks_in_process_and_on_the_endpoint(
    in_process, endpoint, task_dir, tiny_model_dir, tmp_path, capsys
):
    runs = {
        "local": _eval_config(tmp_path, "local", tiny_model_dir, task_dir),
        "remote": _eval_config(
            tmp_path, "remote", tiny_model_dir, task_dir, f"  harness_endpoint: {endpoint}\n"
        ),  # fmt: skip
    }
    reports = {}
    for name, cfg in runs.items():
        assert main(["eval", str(cfg)]) == 0
        out = capsys.readouterr().out
        assert "lm-eval raylm_mc acc" in out and "lm-eval raylm_gen exact_match" in out
        reports[name] = json.loads((tmp_path / name / "eval.json").read_text())
    local, remote = reports["local"]["harness"], reports["remote"]["harness"]
    assert (local["model"], remote["model"]) == ("hf", "local-completions")
    assert remote["endpoint"] == f"{endpoint}/completions"
    want = sum(s["acc"] for s in in_process["raylm_mc"][:4]) / 4  # lm-eval's own, first 4 docs
    for report in (local, remote):
        tasks = {t["task"]: t for t in report["tasks"]}
        assert tasks["raylm_mc"]["n"] == tasks["raylm_gen"]["n"] == 4
        assert tasks["raylm_mc"]["metrics"]["acc"] == pytest.approx(want)
        assert set(tasks["raylm_gen"]["metrics"]) == {"exact_match"}
    assert main(["eval", "--compare", str(tmp_path / "local"), str(tmp_path / "remote")]) == 0
    row = next(x for x in capsys.readouterr().out.splitlines() if "lm-eval raylm_mc acc" in x)
    assert [float(v) for v in row.split()[-3:]] == pytest.approx([want, want, 0.0])


def test_harness_endpoint_errors_name_the_key(endpoint, task_dir, tiny_model_dir, tmp_path, capsys):
    cfg = _eval_config(tmp_path, "bad", tiny_model_dir, task_dir,
                       f"  harness_endpoint: {endpoint}\n  harness_endpoint_model: other\n")  # fmt: skip
    assert main(["eval", str(cfg)]) == 2
    assert "eval.harness_endpoint_model: 'other' is not served" in capsys.readouterr().err
    args = ["eval", "--set", f"eval.model={tiny_model_dir}", "--set", "eval.harness_tasks=[nope_x]",
            "--set", f"eval.harness_include_path=[{task_dir}]"]  # fmt: skip
    assert main(args) == 2
    assert "eval.harness_tasks[0]: 'nope_x': no such lm-eval task" in capsys.readouterr().err
