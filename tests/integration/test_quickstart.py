"""The main job end to end: `raylm quickstart` with smaller sizes on the session's Ray instance.

One module-scoped run of the shipped quickstart (4,000 synthetic documents, 300 pretraining and 300
SFT steps of a 1.1M-parameter model with 2 Ray Train workers under ZeRO-2, in bf16 on a CPU with
bf16 instructions and fp32 elsewhere, DPO from the SFT export on the synthetic preference pairs,
eval of the three exports, a Ray Serve endpoint answering one chat request; only the HTTP port
differs) serves the stage-contract tests; a LoRA fine-tune of the same pretrained export (raylm's
loop on 2 local ranks, ``tests.mp_loop``) is scored against the same control. Held-out sentiment:
200 examples, 100 per label; held-out preference pairs: 240.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from cluster.quickstart import SUMMARY_NAME, run_quickstart

pytestmark = pytest.mark.timeout(1800)
STEPS = 300  # train.max_steps of configs/quickstart.yaml and quickstart_sft.yaml
DPO_STEPS = 50  # train.max_steps of configs/quickstart_dpo.yaml
# What DPO may cost each SFT task, in points (the preference-tuning issue's limit). Measured on 2
# cores in bf16: sentiment 100 -> 99, qa token F1 14 -> 14, rewrite chrF 99.9 -> 98.4 (fp32: 99.5
# -> 100, 12.5 -> 11.5, 97.9 -> 97.7).
TASK_SLACK = 2.0 + 1e-6  # 1e-6: scores are means of 200 floats
QUICKSTART_NUMBERS = Path(__file__).with_name("quickstart_numbers.json")


def _free_port() -> int:
    """A free port below the kernel's ephemeral range: the serve stage binds it minutes after this
    choice, and Ray's many processes take ephemeral ports meanwhile (seen: the proxy failed to bind)."""
    for port in range(23000, 32000, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 23000-32000")


def _overrides() -> list[str]:
    return [f"serve.port={_free_port()}"]


@pytest.fixture(scope="module")
def quickstart(ray_local, tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("quickstart")
    assert run_quickstart(str(workdir), overrides=_overrides(), docs=4000) == 0
    return workdir, json.loads((workdir / SUMMARY_NAME).read_text())


def _eval(workdir: Path, which: str) -> dict:
    report = json.loads((workdir / "eval" / which / "eval.json").read_text())
    (preference,) = report["preference"]
    return {t["task"]: t for t in report["tasks"]} | {"perplexity": report["perplexity"],
                                                      "preference": preference}  # fmt: skip


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def quickstart_numbers(workdir: Path, runs: dict[str, str]) -> dict:
    """What a quickstart run measured: each training run's logged losses and eval losses, and each
    export's eval (task metrics, perplexities, preference metrics). ``runs``: stage -> run dir."""
    out: dict = {}
    for stage, run in sorted(runs.items()):
        rows = _rows(Path(run) / "metrics.jsonl")
        out[f"{stage} losses"] = [r["loss"] for r in rows if "loss" in r]
        out[f"{stage} eval losses"] = [r["eval_loss"] for r in rows if "eval_loss" in r]
    for which in ("pretrain", "sft", "dpo"):
        report = json.loads((workdir / "eval" / which / "eval.json").read_text())
        out[f"{which} eval"] = {
            "tasks": {t["task"]: t["metrics"] for t in report["tasks"]},
            "perplexity": [p["perplexity"] for p in report["perplexity"]],
            "preference": [p["metrics"] for p in report["preference"]],
        }
    return out


def test_data_and_training_stages_meet_their_contracts(quickstart) -> None:
    workdir, summary = quickstart
    pre = json.loads((workdir / "data" / "pretrain" / "manifest.json").read_text())
    assert pre["documents_read"] == 4000 and pre["documents_kept"] > 3900
    sft = json.loads((workdir / "data" / "sft" / "manifest.json").read_text())
    assert sft["documents_read"] == 3000 and sft["splits"]["train"]["rows"] > 0
    pref = json.loads((workdir / "data" / "preference" / "manifest.json").read_text())
    assert (pref["mode"], pref["documents_read"], pref["rejected"]) == ("preference", 480, {})
    for run, steps in (("pretrain run", STEPS), ("sft run", STEPS), ("dpo run", DPO_STEPS)):
        rows = _rows(Path(summary["artifacts"][run]) / "metrics.jsonl")
        assert rows[-1]["step"] == steps
        assert rows[-1]["loss"] < rows[0]["loss"]
        assert any("eval_loss" in r for r in rows)


def test_exports_load_offline_and_stop_at_end_of_turn(quickstart) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, summary = quickstart
    export = Path(summary["artifacts"]["sft export"])
    tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(export, local_files_only=True).eval()
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end in model.generation_config.eos_token_id
    first = (workdir / "corpus" / "sft" / "heldout" / "sentiment.jsonl").read_text().splitlines()[0]
    record = json.loads(first)
    ids = tok.apply_chat_template(record["messages"], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)  # fmt: skip
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=32, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    assert new[-1] == end and len(new) < 32  # stopped by itself, not by the length limit
    assert tok.decode(new, skip_special_tokens=True).strip() == record["reference"]


def test_fine_tuned_model_does_the_tasks_without_forgetting(quickstart) -> None:
    """The aims of the quickstart recipe (bench/RESULTS.md), measured on 2 cores: sentiment 99.5,
    rewrite chrF 97.9, held-out pretraining perplexity 2.48 against the pretrained model's 2.61;
    QA exact match 12.5, short of its aim of 80 (the model does not learn to copy from its context
    in this budget)."""
    workdir, _ = quickstart
    tuned, control = _eval(workdir, "sft"), _eval(workdir, "pretrain")
    sentiment = tuned["sentiment"]
    assert sentiment["n"] == 200  # 100 positive + 100 negative held-out reviews
    assert sentiment["metrics"]["accuracy"] >= 98.0
    assert control["sentiment"]["metrics"]["accuracy"] < 50.0
    assert tuned["rewrite"]["metrics"]["chrf"] >= 95.0  # aim: 60
    assert tuned["qa"]["metrics"]["exact_match"] >= 10.0  # aim 80: not met, see the docstring
    assert tuned["qa"]["metrics"]["token_f1"] > control["qa"]["metrics"]["token_f1"]
    # perplexity_data[0]: held-out pretraining rows; SFT mixes some in, so nothing is forgotten
    pretrained, fine_tuned = (r["perplexity"][0]["perplexity"] for r in (control, tuned))
    assert fine_tuned <= 1.1 * pretrained  # aim: 1.5x


def test_dpo_model_prefers_the_requested_style_and_keeps_the_tasks(quickstart) -> None:
    """The DPO export against the SFT export it started from, on held-out pairs whose prompts ask
    for a bare answer or a full sentence: the SFT model answers bare whatever is asked (half the
    pairs), the DPO model follows the request; the SFT tasks' scores stay where they were."""
    workdir, summary = quickstart
    dpo, sft = _eval(workdir, "dpo"), _eval(workdir, "sft")
    assert dpo["preference"]["n"] == sft["preference"]["n"] == 240
    assert sft["preference"]["metrics"]["win_rate"] == pytest.approx(50.0, abs=10.0)
    assert dpo["preference"]["metrics"]["win_rate"] >= 95.0  # 99.6 measured (fp32: 97.9)
    rows = _rows(Path(summary["artifacts"]["dpo run"]) / "metrics.jsonl")
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"] > 0
    assert rows[-1]["eval_reward_accuracy"] >= 0.9
    for task, metric in (("sentiment", "accuracy"), ("qa", "token_f1"), ("rewrite", "chrf")):
        assert dpo[task]["metrics"][metric] >= sft[task]["metrics"][metric] - TASK_SLACK, task
    assert "win rate" in summary["numbers"]["preference"]


def _cpu_kind() -> str:
    """The CPU's kernel family, which fixes the floating-point summation order: torch's SIMD level
    (AVX2 and AVX512 kernels round differently: recorded AVX512 losses drift from step 40 on an
    AVX2 host), AMX where bf16 matmuls use it, and the vendor (MKL picks code paths by it)."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    vendor = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("vendor_id")), "?")
    return f"{torch.backends.cpu.get_cpu_capability()}{'+AMX' if amx else ''} {vendor}"


def _record_key(summary: dict) -> str:
    """Which recorded run this one must equal: the pretraining run's device and precision (the
    quickstart trains in bf16 on a CPU with bf16 instructions, in fp32 on one without) and, on a
    CPU, its kernel family."""
    from cluster.config import RESOLVED_NAME, load_config

    cfg = load_config(Path(summary["artifacts"]["pretrain run"]) / RESOLVED_NAME)
    if cfg.scaling.use_gpu:
        return f"cuda {cfg.deepspeed.precision}"
    return f"cpu {cfg.deepspeed.precision} {_cpu_kind()}"


def test_numbers_are_those_of_the_recorded_run(quickstart) -> None:
    """The same numbers on every run, against a full `raylm quickstart` run recorded in
    QUICKSTART_NUMBERS for this device, precision and CPU kernel family: every logged training and
    eval loss to 1e-6 (the workers run 1 torch thread each, in their own processes; DPO's reference
    log-probs are scored in the same batches on every run); the evals, which run in this process
    with whatever thread count earlier tests left, as printed (scores to 0.05 points, perplexities
    to 1e-3).
    After a deliberate recipe change, write the new run's numbers there (the failure shows them)."""
    workdir, summary = quickstart
    key = _record_key(summary)
    records = json.loads(QUICKSTART_NUMBERS.read_text())
    if key not in records:
        pytest.skip(f"no recorded quickstart run for {key!r} (recorded: {sorted(records)})")
    runs = {k[: -len(" run")]: v for k, v in summary["artifacts"].items() if k.endswith(" run")}
    got = quickstart_numbers(workdir, runs)
    flat_got, flat_want = _flat(got), _flat(records[key])
    assert sorted(flat_got) == sorted(flat_want), json.dumps(got)
    for name, value in flat_want.items():
        if "eval/" not in name:  # training: losses and eval losses
            tolerance = {"rel": 1e-6, "abs": 1e-9}
        elif "/perplexity/" in name:
            tolerance = {"rel": 1e-3}
        else:
            tolerance = {"abs": 0.05}
        assert flat_got[name] == pytest.approx(value, **tolerance), (name, json.dumps(got))


def _flat(value, key: str = "") -> dict[str, float]:
    if isinstance(value, dict):
        return {
            k: v for name, item in value.items() for k, v in _flat(item, f"{key}{name}/").items()
        }
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flat(item, f"{key}{i}/").items()}
    return {key.rstrip("/"): value}


def test_chat_answer_over_http_ends_with_stop(quickstart) -> None:
    _, summary = quickstart
    chat = summary["chat"]
    assert chat["url"].startswith("http://127.0.0.1:")
    assert chat["finish_reason"] == "stop"
    assert chat["answer"].strip() == chat["reference"]


def test_second_run_reuses_finished_stages(quickstart, capsys) -> None:
    workdir, _ = quickstart
    capsys.readouterr()
    assert run_quickstart(str(workdir), overrides=_overrides(), docs=4000) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[")]
    assert len(lines) == 13
    assert all("(reused" in x for x in lines[:12]), lines  # every stage but serving
    assert "finish_reason stop" in lines[12]


def test_lora_fine_tune_beats_the_control_by_20_points(quickstart, tmp_path) -> None:
    from cluster.config import RESOLVED_NAME, load_config
    from cluster.evaluate import run_eval
    from tests.mp_loop import run_loop
    from training.export import export
    from training.launcher import plan_job, run_dir

    workdir, summary = quickstart
    # In the precision the quickstart chose for this machine (bf16 where the CPU has bf16
    # instructions: 1.3x faster steps), as its SFT stage ran.
    sft = load_config(Path(summary["artifacts"]["sft run"]) / RESOLVED_NAME)
    cfg = load_config(workdir / "configs" / "quickstart_sft.yaml", [
        "name=quickstart-lora",
        f"deepspeed.precision={sft.deepspeed.precision}",
        f"train.storage_path={tmp_path / 'runs'}",
        "train.max_steps=100",
        "train.lr=0.01",
        "train.min_lr=0.001",
        "train.lora.enabled=true",
        "train.lora.rank=16",
        "train.lora.alpha=32",
        "train.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        # The chat tokens never occur in pretraining: their (tied) embeddings must train too.
        "train.lora.modules_to_save=[embed_tokens]",
    ])  # fmt: skip
    run_loop(plan_job(cfg), world=cfg.scaling.num_workers)  # the loop without Ray Train's start-up
    merged = export(run_dir(cfg), tmp_path / "merged")
    heldout = workdir / "corpus" / "sft" / "heldout" / "sentiment.jsonl"
    ecfg = cfg.eval.model_copy(update={"model": str(merged), "tasks": [str(heldout)],
                                       "perplexity_data": [], "output": str(tmp_path / "eval")})  # fmt: skip
    report = run_eval(ecfg, "lora")
    lora = {t["task"]: t for t in report["tasks"]}["sentiment"]["metrics"]["accuracy"]
    control = _eval(workdir, "pretrain")["sentiment"]["metrics"]["accuracy"]
    assert lora >= control + 20.0
    assert lora >= 75.0  # not a constant answer (that would score 50)
