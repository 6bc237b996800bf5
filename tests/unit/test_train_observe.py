"""Metrics beyond metrics.jsonl: TensorBoard events (read back with TensorBoard's own reader), the
driver-side switches, and the driver's progress bar."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import pytest

from tests.unit.test_train_loop import _job
from training.config import TrainConfig
from training.errors import TrainConfigError
from training.loop import WorkerIO, run_worker
from training.observe import TENSORBOARD_DIR, _refresh, resolve_trackers
from training.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("observe") / "ds", train_rows=32,
                                   validation_rows=8, seq_len=32)  # fmt: skip


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(300)
def test_tensorboard_has_the_metrics_rows_once_each_after_a_resume(dataset, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    run_dir, kept = tmp_path / "run", []

    def report(metrics, checkpoint_dir, step, dir_name=None):  # keep checkpoints as Ray would
        if checkpoint_dir is not None:
            kept.append(run_dir / dir_name)
            shutil.copytree(checkpoint_dir, kept[-1], dirs_exist_ok=True)

    job = _job(dataset, run_dir, max_steps=4, lr=3e-3, tensorboard=True)
    job.train = job.train.model_copy(update={"checkpoint_every": 2})
    run_worker(job, WorkerIO(0, 1, report))
    # As after a failure past step 2: resume from the step-2 checkpoint and redo steps 3-4.
    run_worker(job, WorkerIO(0, 1, report, resume_candidates=lambda: [kept[0]]))
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
        got = _scalars(run_dir, f"train/{key}")
        assert [s for s, _ in got] == [1, 2, 3, 4], key  # the discarded 3-4 were purged
        assert [v for _, v in got] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert _scalars(run_dir, "train/eval_loss") == [(4, pytest.approx(rows[-1]["eval_loss"]))]


def test_driver_resolves_tracker_switches_and_refuses_impossible_ones(monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    has_tb = any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX"))
    auto = resolve_trackers(TrainConfig())
    assert auto.tensorboard is has_tb and auto.mlflow is False
    assert resolve_trackers(TrainConfig(tensorboard=False)).tensorboard is False
    with pytest.raises(TrainConfigError, match=r"train\.mlflow: true needs"):
        resolve_trackers(TrainConfig(mlflow=True))  # no package or no tracking URI
    if importlib.util.find_spec("mlflow") is None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/mlruns")
        assert resolve_trackers(TrainConfig()).mlflow is False  # URI alone is not enough


def test_progress_bar_follows_the_last_metrics_row(tmp_path) -> None:
    from tqdm import tqdm

    out = io.StringIO()
    bar = tqdm(total=10, file=out)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 3, "loss": 2.5, "tokens_per_s": 100.0}\n{"step": 4, "loss": 2.25')
    _refresh(bar, path)  # the last line is still being written: the previous row counts
    assert bar.n == 3 and "loss=2.5" in out.getvalue()


def test_mlflow_run_gets_the_rows_and_a_resume_continues_it(tmp_path, monkeypatch) -> None:
    """Runs where mlflow is installed (it is optional; not in the dev extra)."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from training.observe import _Trackers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the file store needs no database
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    train = resolve_trackers(TrainConfig(tensorboard=False))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = _Trackers(run_dir, train)
    first.log({"step": 1, "loss": 2.0, "mfu": None})
    first.close()
    again = _Trackers(run_dir, train)  # a resumed run
    again.log({"step": 2, "loss": 1.5})
    again.close()
    client = MlflowClient(train.mlflow_tracking_uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [
        (1, 2.0),
        (2, 1.5),
    ]
    assert client.get_run(run_id).info.run_name == "run"
