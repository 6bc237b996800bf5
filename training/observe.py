"""Where metrics rows go besides ``metrics.jsonl``: TensorBoard, MLflow, and a driver progress bar.

- TensorBoard and MLflow are written by rank 0 inside the worker, row by row, next to
  ``metrics.jsonl`` (``log_row``, called by the loop where it appends a row). After a resume the
  TensorBoard writer purges the events of steps beyond the last kept metrics row, so the curves
  show the lineage of the weights that exist, as ``metrics.jsonl`` does; MLflow cannot delete
  points, so its history keeps the discarded steps too.
- The progress bar runs on the driver (Ray sends worker output through line-based log files, where
  a carriage-return bar cannot render): a thread follows the tail of ``metrics.jsonl``.
- A worker's own warnings reach the user's console marked (:func:`mark_worker_warnings`); the
  driver (``cluster.logs``) echoes only those and files the rest of the workers' output.

:func:`resolve_trackers` runs on the driver and turns "unset" into on/off, so a worker never
guesses from its own environment (Ray workers get the cluster's environment, not the driver's).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training.config import TrainConfig
from training.errors import TrainConfigError

__all__ = [
    "MLFLOW_EXPERIMENT",
    "TENSORBOARD_DIR",
    "WORKER_MARK",
    "close_trackers",
    "driver_progress",
    "log_row",
    "mark_worker_warnings",
    "resolve_trackers",
]

# Prefix of raylm's own warnings in a worker's stderr: the driver echoes these lines to the console.
WORKER_MARK = "raylm "
RAYLM_LOGGERS = ("cluster", "training", "data_pipelines", "serving")


def mark_worker_warnings() -> None:
    """In a Ray worker: raylm's warnings also go to stderr prefixed with :data:`WORKER_MARK`.

    Idempotent: a worker process that runs several tasks adds the handler once.
    """
    for name in RAYLM_LOGGERS:
        logger = logging.getLogger(name)
        if any(getattr(h, "raylm_mark", False) for h in logger.handlers):
            continue
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter(WORKER_MARK + "%(levelname)s %(name)s: %(message)s"))
        handler.raylm_mark = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


log = logging.getLogger(__name__)
TENSORBOARD_DIR = "tensorboard"
MLFLOW_EXPERIMENT = "raylm"
_MLFLOW_ID = "mlflow_run_id"  # in the run dir: a resumed run continues the same MLflow run
_METRICS = "metrics.jsonl"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_trackers(train: TrainConfig) -> TrainConfig:
    """Driver side: unset tracker switches become True/False; a forced one that cannot work is a
    config error naming the key."""
    tb_ok = _has("tensorboard") or _has("tensorboardX")
    if train.tensorboard and not tb_ok:
        raise TrainConfigError("train.tensorboard: true needs the `tensorboard` package "
                               "(pip install tensorboard)")  # fmt: skip
    uri = train.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if train.mlflow and not _has("mlflow"):
        raise TrainConfigError("train.mlflow: true needs the `mlflow` package "
                               "(pip install mlflow-skinny)")  # fmt: skip
    if train.mlflow and not uri:
        raise TrainConfigError("train.mlflow: true needs train.mlflow_tracking_uri or "
                               "MLFLOW_TRACKING_URI")  # fmt: skip
    mlflow = train.mlflow if train.mlflow is not None else bool(uri) and _has("mlflow")
    return train.model_copy(update={
        "tensorboard": tb_ok if train.tensorboard is None else train.tensorboard,
        "mlflow": mlflow, "mlflow_tracking_uri": uri if mlflow else "",
    })  # fmt: skip


# ---------------------------------------------------------------- rank 0, inside the worker


class _Trackers:
    def __init__(self, run_dir: Path, train: TrainConfig) -> None:
        self.tb: Any = None
        self.mlflow: tuple[Any, str] | None = None
        if train.tensorboard:
            self.tb = _open_tensorboard(run_dir)
        if train.mlflow:
            self.mlflow = _open_mlflow(run_dir, train.mlflow_tracking_uri)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        values = {k: float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, step)
            self.tb.flush()  # a killed worker keeps what it logged
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.set_terminated(run_id)


def _last_logged_step(run_dir: Path) -> int:
    path = run_dir / _METRICS
    if not path.is_file():
        return 0
    steps = [json.loads(x)["step"] for x in path.read_text("utf-8").splitlines() if x.strip()]
    return max(steps, default=0)


def _open_tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
    except ImportError:
        from tensorboardX import SummaryWriter
    # Events of steps after the last kept metrics row belong to discarded work (a resume).
    purge = _last_logged_step(run_dir) + 1
    return SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=purge)


def _open_mlflow(run_dir: Path, uri: str) -> tuple[Any, str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    id_file = run_dir / _MLFLOW_ID
    if id_file.is_file():
        run_id = id_file.read_text("utf-8").strip()
        client.update_run(run_id, status="RUNNING")
        return client, run_id
    exp = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(MLFLOW_EXPERIMENT)
    run = client.create_run(exp_id, run_name=run_dir.name, tags={"raylm.run_dir": str(run_dir)})
    id_file.write_text(run.info.run_id + "\n", "utf-8")
    return client, run.info.run_id


_open: dict[str, _Trackers] = {}  # run dir -> trackers of the loop running in this process


def log_row(run_dir: str, train: TrainConfig, row: dict[str, Any]) -> None:
    """Rank 0: one metrics row to every enabled tracker (opened on first use)."""
    if not (train.tensorboard or train.mlflow):
        return
    if run_dir not in _open:
        _open[run_dir] = _Trackers(Path(run_dir), train)
    _open[run_dir].log(row)


def close_trackers(run_dir: str) -> None:
    trackers = _open.pop(run_dir, None)
    if trackers is not None:
        trackers.close()


# ---------------------------------------------------------------- driver


def _last_row(path: Path) -> dict[str, Any] | None:
    """The last complete row of a jsonl file, reading only its tail."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            return json.loads(line)
    return None


def _refresh(bar: Any, path: Path) -> None:
    row = _last_row(path)
    if row is None:
        return
    bar.n = int(row["step"])
    post = {"loss": row.get("loss"), "tok/s": row.get("tokens_per_s")}
    bar.set_postfix({k: f"{v:.4g}" for k, v in post.items() if isinstance(v, int | float)})


@contextlib.contextmanager
def driver_progress(run_dir: Path, total_steps: int, enabled: bool | None) -> Iterator[None]:
    """A tqdm bar on stderr following rank 0's metrics rows (updates every log_every steps)."""
    if not (sys.stderr.isatty() if enabled is None else enabled):
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=total_steps, desc=f"train {run_dir.name}", unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)  # fmt: skip
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(1.0):
            _refresh(bar, run_dir / _METRICS)

    thread = threading.Thread(target=follow, name="raylm-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        _refresh(bar, run_dir / _METRICS)
        bar.close()
