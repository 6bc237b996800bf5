"""The `raylm` command line as a user runs it: a separate process, its own local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

RAYLM = [sys.executable, "-m", "cluster.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run(args, cwd, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    return subprocess.run(
        RAYLM + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(400)
def test_data_prepare_cli_writes_outputs_and_skips_a_rerun(synth_corpus, tokenizer_dir, tmp_path):
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "cli-test",
                "ray": {"num_cpus": 4},
                "data": {
                    "inputs": [str(synth_corpus / "sft" / "train")],
                    "mode": "sft",
                    "output": str(tmp_path / "out"),
                    "tokenizer": str(tokenizer_dir),
                    "seq_len": 128,
                },
            }
        )
    )
    first = run(["data", "prepare", str(cfg), "--set", "data.sft.pack=true"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "documents:" in first.stdout and "train:" in first.stdout
    for noise in ("max_restarts > 0", "core_worker.cc", "is deprecated"):  # Ray's, not raylm's
        assert noise not in first.stdout + first.stderr, noise
    resolved = yaml.safe_load((tmp_path / "out" / "raylm_config.yaml").read_text())
    assert resolved["data"]["sft"]["pack"] is True and resolved["data"]["seq_len"] == 128
    second = run(["data", "prepare", str(cfg), "--set", "data.sft.pack=true"], tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "already complete: skipped" in second.stdout
    assert "Started a local Ray instance" not in second.stderr


def test_cli_errors_are_one_line_and_start_no_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  seq_len: 4\n")
    res = run(["data", "prepare", str(bad)], tmp_path, timeout=60)
    assert res.returncode == 2
    assert f"{bad}: data.seq_len: Input should be greater than or equal to 8" in res.stderr
    res = run(
        [
            "data",
            "prepare",
            "--set",
            f"data.inputs=[{tmp_path}/none]",
            "--set",
            f"data.tokenizer={tmp_path}",
        ],
        tmp_path,
        timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.strip().endswith(
        f"data.inputs[0]: {tmp_path}/none: no such file or directory"
    )
    res = run(["train"], tmp_path, timeout=60)
    assert res.returncode != 0
