"""Bring your own model: each tested family fine-tuned on 2 ranks, exported, served.

Per family, a tiny random checkpoint built by transformers with the session's tokenizer
(tests/families.py) is SFT-trained for 2 steps by raylm's per-worker loop on 2 local processes
(tests.mp_loop, gloo: the loop Ray Train runs, without its start-up), exported, and loaded by the
serving engine, whose greedy output must equal ``transformers.generate`` on the export. The runs
vary what each family exercises: ZeRO stages 0-3, LoRA (all-linear) on fused projections (Phi-3)
and Conv1D (GPT-2), a ZeRO-3 load of a non-Llama base that no rank holds whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from data_pipelines.chat import end_of_turn_token
from data_pipelines.tokenize import load_tokenizer
from tests.families import save_tiny_model
from tests.mp_loop import run_loop, run_loops
from training.export import export
from training.launcher import plan_job, run_dir

pytestmark = pytest.mark.timeout(600)

# family -> the run's extra overrides
RUNS = {
    "llama": ["deepspeed.zero_stage=2"],
    "mistral": ["deepspeed.zero_stage=1"],
    "qwen2": ["deepspeed.zero_stage=3"],
    "qwen3": ["deepspeed.zero_stage=2", "train.lora.enabled=true"],
    "gemma2": ["deepspeed.zero_stage=2"],
    "gemma3_text": ["deepspeed.zero_stage=0"],
    "phi3": ["deepspeed.zero_stage=2", "train.lora.enabled=true"],
    "gpt2": ["deepspeed.zero_stage=3", "train.lora.enabled=true"],
}
PROMPTS = ["Review: the kettle works perfectly. Is this review positive", "Q: who wrote the"]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def runs(prepared_sft, tokenizer, tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """family -> (base dir, run dir, export dir). All families train one after another on the
    same two spawned ranks (imports and process group paid once), then each is exported."""
    roots = {f: tmp_path_factory.mktemp(f) for f in RUNS}
    bases = {f: save_tiny_model(f, roots[f] / "base", tokenizer) for f in RUNS}
    cfgs = {f: _config(f, prepared_sft, bases[f], roots[f]) for f in RUNS}
    run_loops([plan_job(c) for c in cfgs.values()], world=2, timeout_s=1200)
    return {f: (bases[f], run_dir(c), export(run_dir(c), roots[f] / "export"))
            for f, c in cfgs.items()}  # fmt: skip


def _config(family: str, prepared, base: Path, root: Path):
    return load_config(None, [
        f"name={family}", f"train.storage_path={root / 'runs'}", "train.task=sft",
        f"train.datasets=[{prepared.output}]", f"model.init_from={base}",
        "train.global_batch_tokens=1024", "train.micro_batch_size=2", "train.max_steps=2",
        "train.lr=0.001", "train.warmup_steps=0", "train.log_every=1", "train.eval_batches=1",
        "scaling.num_workers=2", *RUNS[family],
    ])  # fmt: skip


@pytest.mark.parametrize("family", list(RUNS))
def test_family_trains_exports_and_serves(family, runs, tokenizer) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.sampling import SamplingParams

    base, rd, out = runs[family]
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    # The export keeps the family: config class, model_type, tied or untied head as the base.
    got, want = AutoConfig.from_pretrained(out), AutoConfig.from_pretrained(base)
    assert type(got) is type(want) and got.model_type == want.model_type == family
    assert got.tie_word_embeddings == want.tie_word_embeddings
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)) in eos
    # It trained: the exported weights moved away from the base's.
    tuned = AutoModelForCausalLM.from_pretrained(out).eval()
    before = AutoModelForCausalLM.from_pretrained(base)
    moved = [n for n, p in tuned.named_parameters()
             if not torch.equal(p, dict(before.named_parameters())[n])]  # fmt: skip
    assert moved
    engine = Engine(out, EngineConfig(warmup=False))
    seen: set[int] = set()
    try:
        for text in PROMPTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            mask = torch.ones(1, len(ids), dtype=torch.long)
            ref = tuned.generate(torch.tensor([ids]), attention_mask=mask, max_new_tokens=12,
                                 do_sample=False)[0, len(ids):].tolist()  # fmt: skip
            got = engine.generate_sync(ids, SamplingParams(max_tokens=12, temperature=0.0))
            assert got.token_ids == ref, text
            seen.update(ref)
    finally:
        engine.shutdown()
    assert len(seen) > 3, "degenerate tiny model: the comparison would prove nothing"


def test_zero3_load_of_a_non_llama_base_is_partitioned(runs) -> None:
    """ZeRO-3 + init_from (qwen2): right after loading, each rank holds about half the weights."""
    _, rd, _ = runs["qwen2"]
    infos = [json.loads((rd / "workers" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    total = infos[0]["total_params"]
    assert total > 0 and all(i["zero_stage"] == 3 and i["total_params"] == total for i in infos)
    for info in infos:
        # ZeRO-3 pads each parameter to a multiple of the world size: at most 1 extra element each.
        assert total / 2 <= info["local_params"] <= total / 2 + 64


def test_own_checkpoint_tokenizer_template_and_alpaca_data(
    synth_corpus, tokenizer, tmp_path
) -> None:
    """The README's bring-your-own path: a Qwen2 checkpoint with its own ChatML tokenizer and
    template, Alpaca records, `data prepare` -> LoRA `train` on 2 ranks -> `export`."""
    import copy

    from tests.conftest import prepare_data
    from tests.unit.test_chat_templates import QWEN_2_5

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                            "extra_special_tokens": ["<|im_start|>"]},
                           replace_extra_special_tokens=False)  # fmt: skip
    tok.chat_template = QWEN_2_5
    base = save_tiny_model("qwen2", tmp_path / "qwen2", tok)
    records = [json.loads(x) for f in sorted((synth_corpus / "sft" / "train").glob("*.jsonl"))
               for x in f.read_text().splitlines()][:400]  # fmt: skip
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": r["messages"][0]["content"],
                                          "output": r["messages"][1]["content"]}) + "\n"
                              for r in records))  # fmt: skip
    data = prepare_data(base, inputs=[str(alpaca)], output=str(tmp_path / "data"), mode="sft",
                        seq_len=256, validation_fraction=0.1, sft={"pack": True})  # fmt: skip
    assert data.manifest["documents_kept"] > 300 and data.manifest["tokenizer"]["path"] == str(base)
    cfg = load_config(None, [
        "name=byo", f"train.storage_path={tmp_path / 'runs'}", "train.task=sft",
        f"train.datasets=[{data.output}]", f"model.init_from={base}", "train.lora.enabled=true",
        "train.global_batch_tokens=1024", "train.micro_batch_size=2", "train.max_steps=2",
        "train.warmup_steps=0", "train.eval_batches=1", "scaling.num_workers=2",
    ])  # fmt: skip
    run_loop(plan_job(cfg), world=2)
    out = export(run_dir(cfg), tmp_path / "export")
    exported = load_tokenizer(out)
    assert exported.chat_template == QWEN_2_5
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert exported.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    prompt = exported.apply_chat_template([{"role": "user", "content": records[0]["messages"][0]
                                            ["content"]}], tokenize=False,
                                          add_generation_prompt=True)  # fmt: skip
    assert prompt.endswith("<|im_start|>assistant\n")
