"""`raylm eval` on the tiny random model: structure and counts of eval.json, perplexity equal to a
per-document `transformers` forward on the same rows, engine generations equal to `transformers`
greedy generate, refusal of data from another tokenizer, and the CLI (errors, --compare)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from cluster.cli import main
from cluster.evaluate import run_eval
from tests.conftest import prepare_sft_data
from training.config import EvalConfig
from training.evaluate import EvalError, format_table, plan_eval, run_perplexity
from training.scoring import TASK_METRICS, example_score

TASKS = ("sentiment", "qa", "rewrite")
LIMIT = 8
MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny_sft_data(ray_local, synth_corpus, tiny_model_dir, tmp_path_factory):
    """Packed SFT data prepared with the tiny model's own tokenizer (labels + position resets)."""
    out = tmp_path_factory.mktemp("tiny_sft")
    prepare_sft_data(tiny_model_dir, synth_corpus, out)
    return out


@pytest.fixture(scope="module")
def heldout(synth_corpus):
    return [str(synth_corpus / "sft" / "heldout" / f"{t}.jsonl") for t in TASKS]


@pytest.fixture(scope="module")
def report(tiny_model_dir, tiny_sft_data, heldout, tmp_path_factory):
    cfg = EvalConfig(
        model=str(tiny_model_dir),
        perplexity_data=[str(tiny_sft_data)],
        tasks=heldout,
        limit_per_task=LIMIT,
        max_new_tokens=MAX_NEW,
        batch_size=4,
        samples=LIMIT,
        output=str(tmp_path_factory.mktemp("eval_out")),
        device="cpu",
    )
    return run_eval(cfg, "tiny")


def _direct_perplexity(model_dir, data_dir) -> tuple[float, int]:
    """Each document of each validation row run alone (no packing mask), loss on labels != -100."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).eval()
    pad = json.loads((data_dir / "manifest.json").read_text())["pad_token_id"]
    total, count = 0.0, 0
    for f in sorted((data_dir / "validation").glob("*.parquet")):
        table = pq.read_table(f).to_pydict()
        for ids, pos, labels in zip(
            table["input_ids"], table["position_ids"], table["labels"], strict=True
        ):
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in zip(starts, starts[1:], strict=False):
                doc_ids, doc_labels = ids[a:b], labels[a:b]
                if all(t == pad for t in doc_ids) or b - a < 2:
                    continue
                with torch.no_grad():
                    logits = model(torch.tensor([doc_ids])).logits[0, :-1]
                target = torch.tensor(doc_labels[1:])
                total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
                count += int((target != -100).sum())
    return math.exp(total / count), count


@pytest.mark.timeout(600)
def test_eval_report_structure_counts_and_saved_json(report, heldout):
    saved = json.loads((Path(report["config"]["output"]) / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert {t["task"] for t in report["tasks"]} == set(TASKS)
    for t in report["tasks"]:
        assert t["n"] == LIMIT
        assert set(t["metrics"]) == set(TASK_METRICS[t["task"]])
        assert all(0.0 <= v <= 100.0 for v in t["metrics"].values())
        assert len(t["samples"]) == LIMIT
        assert t["files"] == [h for h in heldout if h.endswith(f"/{t['task']}.jsonl")]
        for s in t["samples"]:
            assert s["scores"] == example_score(t["task"], s["prediction"], s["reference"])
        # The task metric is the mean of the example scores (chrF: corpus level, not a mean).
        if t["task"] != "rewrite":
            for name, value in t["metrics"].items():
                mean = np.mean([s["scores"][name] for s in t["samples"]])
                assert value == pytest.approx(100 * mean)
    assert report["timings"]["total_s"] > 0
    table = format_table(report)
    assert "sentiment accuracy" in table and "qa token_f1" in table and "perplexity" in table


@pytest.mark.timeout(600)
def test_perplexity_equals_per_document_transformers_forward(report, tiny_model_dir, tiny_sft_data):
    (ppl,) = report["perplexity"]
    assert math.isfinite(ppl["perplexity"]) and ppl["rows"] > 0
    want, tokens = _direct_perplexity(tiny_model_dir, tiny_sft_data)
    assert ppl["tokens"] == tokens
    assert ppl["perplexity"] == pytest.approx(want, rel=1e-5)
    assert ppl["loss"] == pytest.approx(math.log(want), rel=1e-5)


@pytest.mark.timeout(600)
def test_engine_generations_equal_transformers_greedy_generate(report, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), use_safetensors=True).eval()
    checked = 0
    for t in report["tasks"]:
        for s in t["samples"][:2]:
            msgs = [{"role": "user", "content": s["prompt"]}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            assert text.endswith("<|assistant|>\n")  # the model is asked to write the answer
            ids = tok(text, add_special_tokens=False)["input_ids"]
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
            )[0, len(ids) :]
            assert s["prediction"] == tok.decode(out, skip_special_tokens=True), s["source"]
            checked += 1
    assert checked == 6
    predictions = {s["prediction"] for t in report["tasks"] for s in t["samples"]}
    assert len(predictions) > 3, "degenerate tiny model: the comparison would prove nothing"


def test_distributed_eval_equals_the_in_process_report(
    report, ray_local, tiny_model_dir, tiny_sft_data, heldout, tmp_path
) -> None:
    """eval.distributed: perplexity from 2 actors over the validation rows and generations from
    `raylm generate`'s job give the in-process report's numbers and texts."""
    cfg = EvalConfig(model=str(tiny_model_dir), perplexity_data=[str(tiny_sft_data)],
                     tasks=heldout, limit_per_task=LIMIT, max_new_tokens=MAX_NEW, batch_size=4,
                     samples=LIMIT, output=str(tmp_path / "dist"), device="cpu",
                     distributed=True, actors=2)  # fmt: skip
    dist = run_eval(cfg, "tiny-dist")
    (a,), (b,) = report["perplexity"], dist["perplexity"]
    assert (a["rows"], a["tokens"]) == (b["rows"], b["tokens"])
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    for x, y in zip(report["tasks"], dist["tasks"], strict=True):
        assert x["task"] == y["task"] and x["metrics"] == y["metrics"]
        assert [s["prediction"] for s in x["samples"]] == [s["prediction"] for s in y["samples"]]


def test_data_from_a_larger_tokenizer_is_refused_naming_the_dataset(
    tiny_model_dir, prepared_pretrain
):
    cfg = EvalConfig(model=str(tiny_model_dir), perplexity_data=[str(prepared_pretrain.output)])
    with pytest.raises(EvalError) as err:
        plan_eval(cfg, "x")
    msg = str(err.value)
    assert msg.startswith(f"eval.perplexity_data[0]: {prepared_pretrain.output} was tokenized")
    assert "more than the model's vocab_size" in msg


def test_data_whose_tokenizer_is_gone_is_still_range_checked(
    tiny_model_dir, prepared_pretrain, tmp_path
):
    data = tmp_path / "moved"
    shutil.copytree(prepared_pretrain.output, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["tokenizer"]["path"] = str(tmp_path / "gone")
    (data / "manifest.json").write_text(json.dumps(manifest))
    plan = plan_eval(EvalConfig(model=str(tiny_model_dir), perplexity_data=[str(data)]), "x")
    assert plan.warnings == [
        f"eval.perplexity_data[0]: {data}: its tokenizer ({tmp_path / 'gone'}) is not on this "
        "machine; only token ids were checked against the model's vocab_size"
    ]
    with pytest.raises(EvalError, match=r"eval.perplexity_data\[0\]: .*: token id \d+ is outside"):
        run_perplexity(plan)


# ---------------------------------------------------------------- CLI


def test_cli_bad_inputs_exit_2_naming_the_key(tiny_model_dir, heldout, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert (
        main(["eval", "--set", f"eval.model={missing}", "--set", f"eval.tasks=[{heldout[0]}]"]) == 2
    )
    assert f"eval.model: {missing}: no such directory" in capsys.readouterr().err

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    assert main(["eval", "--set", f"eval.model={tmp_path / 'noweights'}"]) == 2
    assert "no *.safetensors weights" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    good = json.loads(Path(heldout[0]).read_text().splitlines()[0])
    bad.write_text(
        json.dumps(good) + "\n" + json.dumps({k: v for k, v in good.items() if k != "reference"})
    )
    args = ["eval", "--set", f"eval.model={tiny_model_dir}", "--set", f"eval.tasks=[{bad}]"]
    assert main(args) == 2
    assert f"{bad}:2: missing 'reference'" in capsys.readouterr().err

    args[-1] = f"eval.tasks=[{heldout[0]}, {tmp_path / 'none.jsonl'}]"
    assert main(args) == 2
    assert f"eval.tasks[1]: {tmp_path / 'none.jsonl'}: no such file" in capsys.readouterr().err

    long = tmp_path / "long.jsonl"  # longer than the tiny model's 256-token context
    long.write_text(json.dumps({**good, "messages": [{"role": "user", "content": "word " * 400}]}))
    args[-1] = f"eval.tasks=[{long}]"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{long}:1: prompt has" in err and "the model's context is 256" in err


@pytest.mark.timeout(600)
def test_cli_eval_then_compare(tiny_model_dir, heldout, tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"name: cli-eval\neval:\n  model: {tiny_model_dir}\n  tasks: [{heldout[0]}]\n"
        f"  limit_per_task: 4\n  max_new_tokens: 4\n  output: {tmp_path / 'a'}\n"
    )
    assert main(["eval", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"raylm eval: wrote {tmp_path / 'a' / 'eval.json'}" in out
    assert "sentiment accuracy" in out
    assert (tmp_path / "a" / "raylm_config.yaml").is_file()

    a = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert a["tasks"][0]["n"] == 4
    b = json.loads(json.dumps(a))
    b["model"] = "other-model"
    b["tasks"][0]["metrics"]["accuracy"] = a["tasks"][0]["metrics"]["accuracy"] + 12.5
    b["perplexity"] = [{"path": "data/x", "perplexity": 3.5, "tokens": 10}]
    (tmp_path / "b.json").write_text(json.dumps(b))

    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "b.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"A: {a['model']}" and lines[1] == "B: other-model"
    acc = a["tasks"][0]["metrics"]["accuracy"]
    row = next(line.split() for line in lines if line.startswith("sentiment accuracy"))
    assert [float(x) for x in row[2:]] == pytest.approx([acc, acc + 12.5, 12.5], abs=1e-3)
    row = next(line.split() for line in lines if line.startswith("perplexity data/x"))
    assert row[2:] == ["-", "3.500", "-"]

    assert main(["eval", "--compare", str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing'}: no eval.json" in capsys.readouterr().err
    assert main(["eval", str(cfg), "--compare", str(tmp_path / "a"), str(tmp_path / "a")]) == 2
