"""DPO reference log-probs, computed once before training as a Ray Data job, stored next to the rows.

Why not in the workers: a reference model beside the policy doubles what each rank holds (under
ZeRO-3 it would need its own partitioned engine, as OpenRLHF builds one) and its forward runs
again every epoch. Here an actor pool (one GPU per actor on a cluster) scores every pair once with
the reference model; the workers then read two floats per pair with the rows and hold only the
policy. TRL's ``precompute_ref_log_probs`` does the same pass, but in the training process.

Layout, under each prepared dataset dir::

    reference/<key>/train.parquet        row_id int64, chosen_logp, rejected_logp float64 (fp32
    reference/<key>/validation.parquet   values), ascending row_id, one row per prepared row
    reference/<key>/reference.json       what was scored, with what; written last

``key`` hashes the reference model's content (config.json and safetensors bytes), the dataset's
manifest, the vocabulary size and seed (a base that the tokenizer outgrew gets the workers' seeded
new embedding rows) and the precision, so a re-run with the same inputs reuses the result and any
change computes a new one beside it. The dir appears by an atomic rename: a killed job leaves
only a hidden temporary dir.

The scoring is :class:`ReferenceLogps`, a plain callable over a batch (testable without Ray),
through ``training.dpo`` as the workers score the policy: the same collation, forward and sums.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.data import DatasetInfo
from training.errors import TrainConfigError

if TYPE_CHECKING:
    from training.config import ScalingConfig
    from training.loop import WorkerJob

__all__ = [
    "REFERENCE_DIR",
    "ReferenceLogps",
    "compute_reference",
    "ensure_references",
    "model_content_hash",
    "read_reference",
    "reference_dir",
    "reference_ready",
]

log = logging.getLogger(__name__)
REFERENCE_DIR = "reference"
MARKER_NAME = "reference.json"
_FORMAT_VERSION = 1
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def model_content_hash(path: str | Path) -> str:
    """sha256 over a model dir's config.json and safetensors files (names and bytes, sorted)."""
    root = Path(path)
    files = [root / "config.json", *sorted(root.glob("*.safetensors")),
             *sorted(root.glob("*.safetensors.index.json"))]  # fmt: skip
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            continue
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def reference_dir(dataset: str, model_hash: str, vocab_size: int, seed: int, precision: str) -> str:
    """Where a dataset's reference log-probs for this reference model live (absolute path)."""
    root = Path(dataset).resolve()
    manifest = hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    blob = json.dumps([_FORMAT_VERSION, model_hash, manifest, vocab_size, seed, precision])
    return str(root / REFERENCE_DIR / hashlib.sha256(blob.encode()).hexdigest()[:16])


def reference_ready(ref_dir: str | Path) -> bool:
    return (Path(ref_dir) / MARKER_NAME).is_file()


def read_reference(ref_dir: str | Path, split: str) -> dict[str, np.ndarray]:
    """A split's reference log-probs in ascending row_id order: ``ref_chosen_logp`` and
    ``ref_rejected_logp``, (rows,) float64 each."""
    path = Path(ref_dir) / f"{split}.parquet"
    if not reference_ready(ref_dir) or not path.is_file():
        raise TrainConfigError(f"{ref_dir}: reference log-probs missing or incomplete (they are "
                               "computed by `raylm train` before the workers start)")  # fmt: skip
    table = pq.read_table(path)
    ids = table["row_id"].to_numpy()
    if len(ids) and (ids[0] != 0 or np.any(np.diff(ids) != 1)):
        raise TrainConfigError(f"{path}: row_ids are not 0..n-1 in order")
    return {
        "ref_chosen_logp": table["chosen_logp"].to_numpy().astype(np.float64),
        "ref_rejected_logp": table["rejected_logp"].to_numpy().astype(np.float64),
    }


def load_reference_model(model: dict[str, Any], vocab_size: int, seed: int, precision: str) -> Any:
    """The reference as the workers build their policy from ``model.init_from``: same loader,
    same seeded embedding growth."""
    import torch

    from training.config import ModelConfig
    from training.model import build_model, resize_vocab

    cfg = ModelConfig.model_validate(model)
    net = build_model(cfg, vocab_size, getattr(torch, _DTYPES[precision]), seed=seed)
    resize_vocab(net, vocab_size, seed)
    return net.eval()


class ReferenceLogps:
    """Ray Data callable class: pairs in, their reference log-probs out (model loaded once).

    Input columns: ``row_id``, the pair columns (ragged int lists) and ``path``; output: ``row_id``,
    ``path``, ``chosen_logp`` and ``rejected_logp`` (float64 holding fp32 sums over the answer
    tokens, as ``training.dpo.reference_logps`` gives them in a worker).

    It takes whole blocks and scores each file's rows in them ``batch_size`` at a time itself, in
    row_id order: a pair's log-prob depends (~1e-5) on the padding of the batch it is scored in,
    and Ray Data's own batches span blocks (and a block joins files) in whatever order they
    arrive, so the log-probs differed from run to run.
    """

    def __init__(self, model: dict[str, Any], vocab_size: int, seed: int, precision: str,
                 pad_id: int, batch_size: int, device: str = "cpu",
                 threads: int = 1) -> None:  # fmt: skip
        import torch

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.device, self.pad_id, self.batch_size = device, pad_id, batch_size
        self.model = load_reference_model(model, vocab_size, seed, precision).to(device)

    def _score(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from training.dpo import collate_pairs, reference_logps

        cols = collate_pairs(batch, self.pad_id)
        t = {k: torch.from_numpy(cols[k]).to(self.device)
             for k in ("input_ids", "position_ids", "labels")}  # fmt: skip
        chosen, rejected = reference_logps(self.model, t)
        return chosen.double().cpu().numpy(), rejected.double().cpu().numpy()

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(block["row_id"])
        paths = np.asarray(block.get("path", np.full(n, "")), dtype=str)
        order = np.lexsort((block["row_id"], paths))  # each file's rows in file order
        block, paths = {k: v[order] for k, v in block.items()}, paths[order]
        # Batches never span files: a block may join several, in whatever order they came.
        bounds = [0, *(np.flatnonzero(paths[1:] != paths[:-1]) + 1).tolist(), n]
        batches = [(i, min(i + self.batch_size, end))
                   for start, end in zip(bounds[:-1], bounds[1:], strict=True)
                   for i in range(start, end, self.batch_size)]  # fmt: skip
        scored = [self._score({k: v[a:b] for k, v in block.items()}) for a, b in batches]
        chosen = np.concatenate([c for c, _ in scored]) if scored else np.zeros(0)
        rejected = np.concatenate([r for _, r in scored]) if scored else np.zeros(0)
        out = {"row_id": np.asarray(block["row_id"], dtype=np.int64),
               "chosen_logp": chosen, "rejected_logp": rejected}  # fmt: skip
        if "path" in block:
            out["path"] = np.asarray(block["path"], dtype=object)
        return out


def compute_reference(
    info: DatasetInfo,
    ref_dir: str,
    *,
    model: dict[str, Any],
    vocab_size: int,
    seed: int,
    precision: str,
    pad_id: int,
    batch_size: int,
    actors: int,
    cpus_per_actor: float,
    use_gpu: bool,
) -> Path:
    """Score every train and validation pair of ``info`` with the reference ``model`` (a
    ``ModelConfig`` dump whose ``init_from`` is the reference dir) on an actor pool; write
    ``ref_dir``. Returns it at once when it is already complete."""
    import ray
    from ray.data import ActorPoolStrategy

    from data_pipelines.actor_pool import restarts_as_remote_arg
    from training.dpo import PAIR_COLUMNS

    out = Path(ref_dir)
    if reference_ready(out):
        return out
    t0 = time.perf_counter()
    split_of = {_norm(f): s for s in ("train", "validation") for f in info.files[s]}
    # A read task per file (Ray may read several small files in one task); the scorer orders and
    # batches each file's rows itself whatever blocks they come in.
    ds = ray.data.read_parquet(sorted(split_of), columns=["row_id", *PAIR_COLUMNS],
                               include_paths=True, override_num_blocks=len(split_of))  # fmt: skip
    rows = sum(info.rows.values())
    scorer = {"model": model, "vocab_size": vocab_size, "seed": seed, "precision": precision,
              "pad_id": pad_id, "batch_size": batch_size, "device": "cuda" if use_gpu else "cpu",
              "threads": int(cpus_per_actor)}  # fmt: skip
    # From 1 actor up (the pairs may come as one block); a dead actor fails the job.
    pool = ActorPoolStrategy(min_size=1, max_size=max(1, min(actors, -(-rows // batch_size))))
    with restarts_as_remote_arg():
        ds = ds.map_batches(ReferenceLogps, fn_constructor_kwargs=scorer, batch_size=None,
                            batch_format="numpy", compute=pool, num_cpus=cpus_per_actor,
                            num_gpus=1 if use_gpu else 0, max_restarts=0)  # fmt: skip
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    tables = _split_tables(parts, split_of, info)
    _write_atomically(out, tables, {
        "version": _FORMAT_VERSION, "dataset": info.path, "reference_model": model["init_from"],
        "vocab_size": vocab_size, "seed": seed, "precision": precision,
        "rows": {s: t.num_rows for s, t in tables.items()},
        "seconds": round(time.perf_counter() - t0, 1), "actors": actors,
    })  # fmt: skip
    log.info("reference log-probs of %s: %d rows in %.1fs -> %s", info.path, rows,
             time.perf_counter() - t0, out)  # fmt: skip
    return out


def _norm(path: Any) -> str:
    return "/" + str(path).lstrip("/")


def _split_tables(
    parts: list[dict[str, np.ndarray]], split_of: dict[str, str], info: DatasetInfo
) -> dict[str, pa.Table]:
    """Scored batches -> one table per split in ascending row_id, every prepared row once."""

    def col(name: str) -> np.ndarray:
        return np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)

    # Ray Data may drop the leading "/" of a local path.
    splits = np.asarray([split_of.get(_norm(p), "") for p in col("path")], dtype=object)
    ids, chosen, rejected = col("row_id").astype(np.int64), col("chosen_logp"), col("rejected_logp")
    tables = {}
    for split in ("train", "validation"):
        sel = splits == split
        order = np.argsort(ids[sel], kind="stable")
        split_ids = ids[sel][order]
        if not np.array_equal(split_ids, np.arange(info.rows[split])):
            raise RuntimeError(f"{info.path}: the reference job scored {len(split_ids)} {split} "
                               f"rows, the split has {info.rows[split]}")  # fmt: skip
        tables[split] = pa.table({"row_id": pa.array(split_ids, pa.int64()),
                                  "chosen_logp": pa.array(chosen[sel][order], pa.float64()),
                                  "rejected_logp": pa.array(rejected[sel][order], pa.float64())})  # fmt: skip
    return tables


def _write_atomically(out: Path, tables: dict[str, pa.Table], marker: dict[str, Any]) -> None:
    """Write into a hidden sibling, then rename: readers see a complete dir or none. A concurrent
    run that finished first wins (same inputs, same values)."""
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for split, table in tables.items():
            pq.write_table(table, tmp / f"{split}.parquet")
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=1), encoding="utf-8")
        try:
            tmp.rename(out)
        except OSError:
            if not reference_ready(out):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_references(job: WorkerJob, scaling: ScalingConfig) -> list[Path]:
    """Every dataset's reference log-probs for ``job`` (planned by ``plan_job``), computed where
    missing on ``scaling.num_workers`` actors with the workers' CPUs (and a GPU each with
    ``scaling.use_gpu``). Runs on the driver, inside a Ray session; nothing to do (and no Ray
    needed) when the job's reference is not precomputed."""
    if not job.reference:
        return []
    model = job.model.model_copy(update={"init_from": job.train.dpo.reference_model})
    return [
        compute_reference(info, ref_dir, model=model.model_dump(mode="json"),
                          vocab_size=job.vocab_size, seed=job.seed,
                          precision=job.deepspeed.precision, pad_id=job.pad_id,
                          batch_size=job.train.micro_batch_size, actors=scaling.num_workers,
                          cpus_per_actor=scaling.cpus_per_worker, use_gpu=job.use_gpu)
        for info, ref_dir in zip(job.datasets, job.reference, strict=True)
    ]  # fmt: skip
