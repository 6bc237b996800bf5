"""`raylm generate` before Ray starts: inputs and model checked with one-line errors, and the
fingerprint that skips a re-run covers input bytes, model files and output-changing keys only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from data_pipelines.errors import DataError
from serving.batch_job import MANIFEST_NAME, RESULTS_DIR, plan_generate
from serving.config import GenerateConfig


@pytest.fixture
def job(tmp_path):
    """A prompts file, a stand-in model dir (the plan reads its bytes, never loads it), a config."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    (tmp_path / "in" / "README.md").write_text("not prompts\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    return GenerateConfig(inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"),
                          model=str(model))  # fmt: skip


def _complete(cfg: GenerateConfig, fingerprint: str) -> None:
    """What a finished run leaves: one result file and the manifest naming it."""
    results = Path(cfg.output) / RESULTS_DIR
    results.mkdir(parents=True)
    (results / "part-00000.parquet").write_bytes(b"rows")
    manifest = {"fingerprint": fingerprint, "file_sizes": {"part-00000.parquet": 4}}
    (results.parent / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_a_complete_output_is_found_and_only_output_changing_keys_count(job, tmp_path):
    plan = plan_generate(job)
    assert plan.existing is None and list(plan.input_hashes) == [str(tmp_path / "in/a.jsonl")]
    _complete(job, plan.fingerprint)
    assert plan_generate(job).existing is not None
    faster = job.model_copy(update={"num_actors": 4, "batch_size": 7, "calls_per_actor": 3,
                                    "engine": job.engine.model_copy(update={"max_num_seqs": 2})})  # fmt: skip
    assert plan_generate(faster).fingerprint == plan.fingerprint
    hotter = job.model_copy(update={"sampling": job.sampling.model_copy(update={"top_p": 0.5})})
    assert plan_generate(hotter).existing is None
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weightz")
    assert plan_generate(job).existing is None
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "out" / RESULTS_DIR / "part-00000.parquet").write_bytes(b"cut")
    assert plan_generate(job).existing is None  # a damaged output is redone


def test_unusable_inputs_and_models_stop_with_one_line(job, tmp_path):
    with pytest.raises(DataError, match=r"^generate.model: unset; name an exported"):
        plan_generate(job.model_copy(update={"model": ""}))
    with pytest.raises(DataError, match=r"generate.model: .*/in: not a Hugging Face model dir"):
        plan_generate(job.model_copy(update={"model": str(tmp_path / "in")}))
    with pytest.raises(DataError, match=r"^generate.inputs\[0\]: .*/nope: no such file"):
        plan_generate(job.model_copy(update={"inputs": [str(tmp_path / "nope")]}))
    with pytest.raises(DataError, match=r"^generate.inputs: no jsonl or parquet files in"):
        plan_generate(job.model_copy(update={"inputs": [str(tmp_path / "in" / "README.md")]}))


def test_the_command_reports_a_bad_model_before_starting_ray(job, capsys):
    code = main(
        ["generate", f"--set=generate.inputs={job.inputs}", "--set=generate.model=/nowhere"]
    )
    err = capsys.readouterr().err
    assert code == 1 and err == "raylm: generate.model: /nowhere: not a Hugging Face model dir " \
                                "(no config.json)\n"  # fmt: skip
    assert main(["generate", "--set=generate.batch_size=0"]) == 2
