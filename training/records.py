"""Run-dir records besides ``metrics.jsonl``: per-rank worker facts, trained row ids, run events.

Layout under the run dir (every file is rank-specific or written by rank 0 only, so ranks never
overwrite each other's files on shared storage):
- ``workers/rank_R.json``: that rank's facts right after model construction (local vs total
  parameter count: under ZeRO-3 a rank holds about total/world);
- ``row_ids/rank_R.jsonl``: one line per optimizer step, ``{"step", "row_ids"}`` of the rows that
  rank trained on (only when the job asks for it: an audit trail, one line per step);
- ``events.jsonl`` (rank 0): resumes and the checkpoints skipped on the way, for users and tests
  (worker logs do not reach the driver).

After a resume, rows for steps beyond the resumed step are trimmed, so the files describe the
lineage of the weights that exist, not every attempt.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "EVENTS_NAME",
    "METRICS_NAME",
    "append_event",
    "append_row_ids",
    "local_param_counts",
    "read_events",
    "read_row_ids",
    "trim_jsonl",
    "trim_row_ids",
    "write_worker_info",
]

EVENTS_NAME = "events.jsonl"
METRICS_NAME = "metrics.jsonl"  # rank 0: one row per logged step (written by training.loop)


def local_param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model); tied parameters counted once.

    ZeRO-3 parameters (after ``zero.Init``) are empty placeholders with the local partition in
    ``ds_tensor`` and the full size in ``ds_numel``.
    """
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += int(p.ds_numel)
        else:
            local += p.numel()
            total += p.numel()
    return local, total


def write_worker_info(run_dir: Path, rank: int, info: dict[str, Any]) -> None:
    out = run_dir / "workers"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{rank}.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def _row_ids_path(run_dir: Path, rank: int) -> Path:
    return run_dir / "row_ids" / f"rank_{rank}.jsonl"


def append_row_ids(run_dir: Path, rank: int, step: int, micro_batches: list[dict]) -> None:
    """Record the row ids of one optimizer step on this rank (host-side numpy; no device sync)."""
    ids = np.concatenate([np.asarray(mb["row_id"]).reshape(-1) for mb in micro_batches])
    path = _row_ids_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "row_ids": ids.tolist()}) + "\n")


def read_row_ids(run_dir: str | Path) -> dict[int, dict[int, list[int]]]:
    """rank -> step -> row ids, from every ``row_ids/rank_R.jsonl`` of a run dir."""
    out: dict[int, dict[int, list[int]]] = {}
    for path in sorted(Path(run_dir, "row_ids").glob("rank_*.jsonl")):
        rank = int(path.stem.split("_")[1])
        out[rank] = {r["step"]: r["row_ids"] for r in _read_jsonl(path)}
    return out


def trim_row_ids(run_dir: Path, rank: int, step: int) -> None:
    trim_jsonl(_row_ids_path(run_dir, rank), step)


def append_event(run_dir: Path, event: str, **fields: Any) -> None:
    """Rank 0 only: one JSON line with a wall-clock time."""
    run_dir.mkdir(parents=True, exist_ok=True)
    row = {"event": event, "time": time.time(), **fields}
    with (run_dir / EVENTS_NAME).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    return _read_jsonl(Path(run_dir) / EVENTS_NAME)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


def trim_jsonl(path: Path, step: int) -> None:
    """Drop rows whose ``step`` is beyond ``step`` (they will be trained again after a resume)."""
    if not path.is_file():
        return
    keep = [r for r in _read_jsonl(path) if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
