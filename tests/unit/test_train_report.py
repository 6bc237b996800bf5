"""`raylm report` on a hand-written run dir: PNGs that are real images, and a one-screen summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.cli import main
from training.report import read_metrics, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_dir(tmp_path: Path) -> Path:
    rows = [
        {"step": s, "loss": 5.0 - 0.4 * s, "lr": 1e-3 * min(1, s / 2), "tokens_per_s": 1000.0 + s,
         "grad_norm": 1.5, "mfu": None, "tokens_seen": 256 * s, "epoch": 0}
        for s in range(1, 7)
    ]  # fmt: skip
    rows[2] |= {"eval_loss": 3.2, "perplexity": 24.5}
    rows[5] |= {"eval_loss": 2.9, "perplexity": 18.2}
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "events.jsonl").write_text(
        json.dumps(
            {"event": "resume", "step": 3, "checkpoint": "/x/checkpoint_00000003", "skipped": []}
        )
        + "\n"  # fmt: skip
    )
    (tmp_path / "checkpoint_00000006").mkdir()
    return tmp_path


def test_report_writes_plots_and_summary(tmp_path) -> None:
    result = report(_run_dir(tmp_path))
    names = sorted(p.name for p in result.plots)
    assert names == ["eval.png", "loss.png", "lr.png", "tokens_per_s.png"]
    for p in result.plots:
        assert p.parent == tmp_path / "plots" and p.read_bytes()[:8] == PNG_MAGIC
        assert p.stat().st_size > 5_000  # axes and a curve, not an empty canvas
    text = result.summary
    assert len(text.splitlines()) <= 12
    assert "6 logged" in text and "1,536" in text  # steps and tokens seen
    assert "first 4.6" in text and "last 2.6" in text
    assert "best 2.9 at step 6" in text and "ppl 18.17" in text
    assert "median 1,004" in text
    assert "step 3 from checkpoint_00000003" in text and "checkpoint_00000006" in text


def test_report_without_eval_rows_skips_eval_plot(tmp_path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 3.0, "lr": 0.1, "tokens_per_s": 9.0}) + "\n"
    )
    result = report(tmp_path)
    assert sorted(p.name for p in result.plots) == ["loss.png", "lr.png", "tokens_per_s.png"]
    assert "eval loss" not in result.summary


def test_dpo_run_gets_reward_plots_and_a_preference_line(tmp_path) -> None:
    rows = [{"step": s, "loss": 0.69 - 0.1 * s, "lr": 1e-3, "tokens_per_s": 9.0,
             "rewards_chosen": 0.1 * s, "rewards_rejected": -0.1 * s, "reward_margin": 0.2 * s,
             "reward_accuracy": 0.5 + 0.1 * s} for s in range(1, 4)]  # fmt: skip
    rows[-1] |= {"eval_loss": 0.4, "perplexity": 3.0, "eval_reward_accuracy": 0.875,
                 "eval_reward_margin": 0.55}  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = report(tmp_path)
    names = sorted(p.name for p in result.plots)
    assert names == ["eval.png", "loss.png", "lr.png", "reward_accuracy.png", "rewards.png",
                     "tokens_per_s.png"]  # fmt: skip
    assert "held-out reward accuracy last 87.5%  margin last 0.55" in result.summary
    assert len(result.summary.splitlines()) <= 12


def test_report_errors_name_file_and_line(tmp_path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"loss": oops\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(tmp_path)
    assert main(["report", str(tmp_path)]) == 1
    assert "metrics.jsonl:2" in capsys.readouterr().err


def test_cli_report_prints_summary(tmp_path, capsys) -> None:
    assert main(["report", str(_run_dir(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "train loss" in out and "plots:" in out and "loss.png" in out
