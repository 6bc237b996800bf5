"""Checkpoint state beyond the DeepSpeed engine, and the integrity manifest.

A checkpoint dir (after Ray merges the per-rank dirs) holds:
- DeepSpeed's ``latest`` + ``global_stepN/`` (model, optimizer and scheduler shards, rank-specific
  file names);
- ``raylm_state.json`` (rank 0): step, tokens seen, data position, world size, config hash, the
  keys a resume must match and provenance (seed, dataset manifest hashes, git commit);
- ``hf_config.json`` (rank 0): the model's transformers config, for export;
- ``rng/rank_R.pt`` (every rank): that rank's torch / numpy / python RNG states;
- ``integrity/rank_R.json`` (every rank, written last): sha256 and size of every file that rank wrote
  (a checkpoint written in place: rank R's share of all its files, hashed after every rank wrote).

Each rank saves into its own fresh local dir, so "every file in my dir" is exactly what it wrote;
verification needs all ``world_size`` integrity files and every listed hash to match, so a truncated
or partially uploaded checkpoint is detected before DeepSpeed unpickles its optimizer state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.errors import CheckpointError

__all__ = [
    "HF_CONFIG_NAME",
    "STATE_NAME",
    "TrainState",
    "checkpoint_dirs",
    "checkpoint_name",
    "git_commit",
    "load_rng",
    "package_versions",
    "read_state",
    "resume_mismatch",
    "save_rng",
    "verify_checkpoint",
    "write_integrity",
    "write_state",
]

STATE_NAME = "raylm_state.json"
HF_CONFIG_NAME = "hf_config.json"  # rank 0: the model's transformers config


@dataclass
class TrainState:
    """Everything a resume needs besides the engine: where training stands and what it was."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # input tokens (padding included) over all ranks
    loss_tokens_seen: int = 0  # tokens that carried loss
    skipped_steps: int = 0  # non-finite updates skipped (train.nonfinite: skip)
    epoch: int = 0  # data position of the next step: (epoch, step_in_epoch)
    step_in_epoch: int = 0
    world_size: int = 1
    config_hash: str = ""
    resume_keys: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)  # seed, manifests, git commit
    # "" or "_fromNNNNNNNN": set when a resume fell back past newer (broken) checkpoints, so the
    # steps trained again get new dir names; Ray would otherwise prune the broken entry of the
    # same name and delete the fresh checkpoint with it. Carried on by later checkpoints.
    lineage: str = ""


def checkpoint_name(state: TrainState) -> str:
    """Dir name of the checkpoint of ``state`` (a re-trained step sorts after its broken twin)."""
    return f"checkpoint_{state.step:08d}{state.lineage}"


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """A run dir's checkpoint dirs, newest first (a ``_fromNNNNNNNN`` re-train before its broken
    twin of the same step)."""
    return sorted((p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()), reverse=True)


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "deepspeed", "transformers", "ray", "raylm"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def git_commit() -> str:
    """The raylm source's git commit, or "" outside a checkout (e.g. a wheel install)."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_state(ckpt_dir: Path, state: TrainState) -> None:
    (ckpt_dir / STATE_NAME).write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")


def read_state(ckpt_dir: Path) -> TrainState:
    return TrainState(**json.loads((ckpt_dir / STATE_NAME).read_text(encoding="utf-8")))


def save_rng(ckpt_dir: Path, rank: int) -> None:
    out = ckpt_dir / "rng"
    out.mkdir(parents=True, exist_ok=True)
    np_state = np.random.get_state()
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": json.dumps(random.getstate()),
        },
        out / f"rank_{rank}.pt",
    )


def load_rng(ckpt_dir: Path, rank: int) -> None:
    path = ckpt_dir / "rng" / f"rank_{rank}.pt"
    if not path.is_file():  # a resume on more ranks than saved: keep the seeded state
        return
    st = torch.load(path, weights_only=False)
    torch.set_rng_state(st["torch"])
    np.random.set_state(
        (st["numpy"][0], st["numpy"][1].numpy().astype(np.uint32), *st["numpy"][2:])
    )
    py = json.loads(st["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def write_integrity(ckpt_dir: Path, rank: int, share: tuple[int, int] | None = None) -> Path:
    """Hash every file under this rank's dir; call it after everything else is written.

    ``share=(i, n)``: the dir is shared by n ranks that have all finished writing (a checkpoint
    written in place); this rank hashes every n-th file from the i-th, so the n manifests together
    cover every file once.
    """
    files = sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.parent.name != "integrity")
    if share is not None:
        files = files[share[0] :: share[1]]
    entries = {str(p.relative_to(ckpt_dir)): [_sha256(p), p.stat().st_size] for p in files}
    out = ckpt_dir / "integrity"
    out.mkdir(exist_ok=True)
    target = out / f"rank_{rank}.json"
    target.write_text(json.dumps(entries, indent=0, sort_keys=True), encoding="utf-8")
    return target


def verify_checkpoint(ckpt_dir: str | Path) -> TrainState:
    """Raise CheckpointError naming the first missing or corrupt file; return the train state."""
    root = Path(ckpt_dir)
    if not (root / STATE_NAME).is_file():
        raise CheckpointError(f"{root}: no {STATE_NAME} (incomplete checkpoint)")
    state = read_state(root)
    for rank in range(state.world_size):
        manifest = root / "integrity" / f"rank_{rank}.json"
        if not manifest.is_file():
            raise CheckpointError(f"{root}: integrity manifest of rank {rank} missing")
        for rel, (digest, size) in json.loads(manifest.read_text(encoding="utf-8")).items():
            path = root / rel
            if not path.is_file() or path.stat().st_size != size or _sha256(path) != digest:
                raise CheckpointError(f"{root}: {rel} is missing or corrupt")
    return state


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between a checkpoint and the current config."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k} ({saved.get(k)!r} -> {current.get(k)!r})"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
