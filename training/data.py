"""Deterministic per-rank data: which rows each rank trains on at each step, and reading them.

Why not Ray Data's ``streaming_split``: it hands blocks to ranks dynamically, so which rows a rank
sees depends on timing, ranks can get unequal batch counts (a collective then hangs), and a resume
cannot reproduce the order. Here the order is a pure function of (seed, epoch, dataset sizes,
weights, world size, rank): every rank computes the same global order and takes its slice.

How rows are read: each rank reads the prepared parquet directly with pyarrow from the shared
prepared dir (the same every-node-reachable storage the run dir needs), keeping only the rows of
its own slice for the current epoch (about 1/world_size of the data in memory). That is the
simplest reader that is exactly reproducible; Ray Data would add a second scheduler whose block
order we would then have to undo.

Mixing: dataset i contributes ``n_i = floor(total * w_i / sum(w))`` samples per epoch (total = sum
of dataset sizes), drawn from its own endless stream of seeded permutations (a dataset sampled below
its size continues where it stopped next epoch; above its size it repeats only after a full pass).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from training.errors import TrainConfigError

__all__ = [
    "DatasetInfo",
    "EpochShard",
    "MixedRows",
    "dataset_info",
    "epoch_order",
    "rank_row_order",
    "shard_epoch",
]

MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs from one ``data prepare`` output dir."""

    path: str
    seq_len: int
    tokenizer_path: str
    pad_token_id: int | None
    rows: dict[str, int]  # split -> rows
    files: dict[str, list[str]] = field(default_factory=dict)  # split -> absolute parquet paths
    has_labels: bool = False
    tokenizer_fingerprint: str = ""
    packed: bool = True  # rows may hold several documents (older manifests: assumed)


def _split_files(root: Path, split: str, manifest: dict) -> list[str]:
    names = manifest.get("splits", {}).get(split, {}).get("files")
    if names:
        return [str(root / split / n) for n in names]
    return sorted(str(p) for p in (root / split).glob("*.parquet"))


def dataset_info(path: str, key: str = "train.datasets") -> DatasetInfo:
    """Read ``manifest.json``; errors name the config key and the path."""
    # Absolute: Ray Train workers run in their own working directory, not the driver's.
    root = Path(path).resolve()
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise TrainConfigError(f"{key}: {path} has no {MANIFEST_NAME} (run `raylm data prepare`)")
    manifest = json.loads(mpath.read_text(encoding="utf-8"))
    splits = manifest.get("splits", {})
    files = {s: _split_files(root, s, manifest) for s in ("train", "validation")}
    rows = {s: int(splits.get(s, {}).get("rows", 0)) for s in ("train", "validation")}
    if rows["train"] <= 0 or not files["train"]:
        raise TrainConfigError(f"{key}: {path} has no training rows")
    has_labels = "labels" in pq.read_schema(files["train"][0]).names
    return DatasetInfo(
        path=str(root),
        seq_len=int(manifest["seq_len"]),
        tokenizer_path=str(manifest.get("tokenizer", {}).get("path", "")),
        tokenizer_fingerprint=str(manifest.get("tokenizer", {}).get("fingerprint", "")),
        pad_token_id=manifest.get("pad_token_id"),
        rows=rows,
        files=files,
        has_labels=has_labels,
        packed=bool(manifest.get("packed", True)),
    )


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def _stream_take(seed: int, ds_index: int, size: int, start: int, count: int) -> np.ndarray:
    """Positions [start, start+count) of dataset ``ds_index``'s endless permutation stream."""
    out, pos = [], start
    while len(out) < count:
        cycle, offset = divmod(pos, size)
        perm = _rng(seed, 1, ds_index, cycle).permutation(size)
        chunk = perm[offset : offset + (count - len(out))]
        out.extend(chunk.tolist())
        pos += len(chunk)
    return np.asarray(out, dtype=np.int64)


def epoch_order(epoch: int, seed: int, sizes: list[int], weights: list[float]) -> np.ndarray:
    """The epoch's global sample order: (n, 2) int64 of (dataset index, row position).

    Row position p means the p-th row of that dataset in ascending ``row_id`` order.
    """
    total = sum(sizes)
    wsum = float(sum(weights))
    parts = []
    for i, (size, w) in enumerate(zip(sizes, weights, strict=True)):
        n_i = size if len(sizes) == 1 else int(total * w / wsum)
        rows = _stream_take(seed, i, size, epoch * n_i, n_i)
        parts.append(np.stack([np.full(n_i, i, dtype=np.int64), rows], axis=1))
    order = np.concatenate(parts, axis=0)
    # Interleave datasets (and shuffle within one) with a per-epoch seeded permutation.
    return order[_rng(seed, 2, epoch).permutation(len(order))]


@dataclass(frozen=True)
class EpochShard:
    """One rank's rows for one epoch: ``rows[step, k]`` is a (dataset, position) pair."""

    rows: np.ndarray  # (steps, rows_per_rank, 2) int64
    steps: int
    dropped: int  # tail samples of the epoch that fit no full global batch


def shard_epoch(order: np.ndarray, global_rows: int, world_size: int, rank: int) -> EpochShard:
    """Cut the epoch into global batches (tail dropped) and take this rank's contiguous slice.

    Step s uses global samples [s*G, (s+1)*G); rank r gets [s*G + r*G/W, s*G + (r+1)*G/W), so the
    rows of one optimizer step do not depend on the world size (only how they are split).
    """
    if global_rows % world_size:
        raise ValueError(
            f"global batch of {global_rows} rows does not split over {world_size} ranks"
        )
    steps = len(order) // global_rows
    per_rank = global_rows // world_size
    used = order[: steps * global_rows].reshape(steps, world_size, per_rank, -1)
    return EpochShard(rows=used[:, rank], steps=steps, dropped=len(order) - steps * global_rows)


def rank_row_order(
    epoch: int, seed: int, total_rows: int, world_size: int, rank: int, global_rows: int
) -> EpochShard:
    """Single-dataset form: row positions (steps, rows_per_rank) for ``rank`` in ``epoch``."""
    shard = shard_epoch(
        epoch_order(epoch, seed, [total_rows], [1.0]), global_rows, world_size, rank
    )
    return EpochShard(rows=shard.rows[..., 1], steps=shard.steps, dropped=shard.dropped)


class _SplitReader:
    """Rows of one dataset split, addressed by position in ascending row_id order.

    ``columns`` may name ``labels`` for a dataset without them (a pretraining dataset mixed into
    SFT): its labels are then its input_ids, so every real next token carries loss (``loss_targets``
    still masks padding and document starts).
    """

    def __init__(self, files: list[str], columns: list[str]):
        self.files = files
        self.fill_labels = "labels" in columns and "labels" not in pq.read_schema(files[0]).names
        self.columns = [c for c in columns if not (c == "labels" and self.fill_labels)]
        # (n,) int64 per file; only the row_id column is read up front (8 bytes per row).
        self._ids = [pq.read_table(f, columns=["row_id"])["row_id"].to_numpy() for f in files]
        all_ids = np.concatenate(self._ids)
        self.sorted_ids = np.sort(all_ids)
        if len(np.unique(self.sorted_ids)) != len(self.sorted_ids):
            raise TrainConfigError(f"{Path(files[0]).parent}: duplicate row_id values")

    def __len__(self) -> int:
        return len(self.sorted_ids)

    def read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``positions`` (any order, repeats allowed), one pass over the needed files."""
        wanted = self.sorted_ids[positions]  # (k,) row ids
        out = {c: None for c in self.columns}
        found = np.zeros(len(wanted), dtype=bool)
        for f, ids in zip(self.files, self._ids, strict=True):
            hit = np.isin(wanted, ids)
            if not hit.any():
                continue
            table = pq.read_table(f, columns=self.columns)
            local = {int(r): i for i, r in enumerate(ids)}
            take = np.array([local[int(r)] for r in wanted[hit]], dtype=np.int64)
            part = table.take(take)
            for c in self.columns:
                col = part[c]
                arr = (
                    col.to_numpy()
                    if c == "row_id"
                    else np.stack(col.to_numpy(zero_copy_only=False))
                )
                if out[c] is None:
                    shape = (len(wanted),) + arr.shape[1:]
                    out[c] = np.zeros(shape, dtype=np.int64 if c == "row_id" else np.int32)
                out[c][hit] = arr
            found |= hit
        if self.fill_labels:
            out["labels"] = out["input_ids"].copy()
        return out


def _columns(infos: list[DatasetInfo]) -> list[str]:
    """Columns every micro-batch carries: ``labels`` when any dataset has them (SFT, possibly with
    pretraining datasets mixed in to keep the base model's language ability)."""
    base = ["row_id", "input_ids", "position_ids"]
    return base + ["labels"] if any(i.has_labels for i in infos) else base


class MixedRows:
    """One rank's view of the mixed training data: per-step micro-batches, from any start step."""

    def __init__(self, infos: list[DatasetInfo], weights: list[float], seed: int,
                 global_rows: int, micro_batch: int, world_size: int, rank: int):  # fmt: skip
        self.columns = _columns(infos)
        self.readers = [_SplitReader(i.files["train"], self.columns) for i in infos]
        self.sizes = [len(r) for r in self.readers]
        self.weights, self.seed = list(weights), seed
        self.global_rows, self.micro_batch = global_rows, micro_batch
        self.world_size, self.rank = world_size, rank
        first = shard_epoch(
            epoch_order(0, seed, self.sizes, self.weights), global_rows, world_size, 0
        )
        self.steps_per_epoch, self.dropped_per_epoch = first.steps, first.dropped
        if self.steps_per_epoch == 0:
            raise TrainConfigError(
                f"train.global_batch_tokens: one step needs {global_rows} rows but an epoch has "
                f"only {sum(self.sizes)}"
            )

    def _epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        order = epoch_order(epoch, self.seed, self.sizes, self.weights)
        shard = shard_epoch(order, self.global_rows, self.world_size, self.rank)
        flat = shard.rows.reshape(-1, 2)  # (steps * rows_per_rank, 2) in training order
        out: dict[str, np.ndarray] = {}
        for i, reader in enumerate(self.readers):
            sel = flat[:, 0] == i
            if not sel.any():
                continue
            part = reader.read(flat[sel, 1])
            for c, arr in part.items():
                if c not in out:
                    out[c] = np.zeros((len(flat),) + arr.shape[1:], dtype=arr.dtype)
                out[c][sel] = arr
        return out

    def iter_steps(self, start_step: int, end_step: int) -> Iterator[list[dict[str, np.ndarray]]]:
        """For each global step in [start_step, end_step): its micro-batches for this rank."""
        per_rank = self.global_rows // self.world_size
        epoch, rows = -1, {}
        for step in range(start_step, end_step):
            e, s = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, rows = e, self._epoch_rows(e)
            lo = s * per_rank
            yield [
                {c: a[lo + m : lo + m + self.micro_batch] for c, a in rows.items()}
                for m in range(0, per_rank, self.micro_batch)
            ]


def validation_batches(
    infos: list[DatasetInfo], micro_batch: int, world_size: int, rank: int, max_batches: int
) -> list[dict[str, np.ndarray]]:
    """This rank's held-out micro-batches: the same count on every rank (eval is a collective).

    Validation rows of all datasets in row_id order; micro-batch k goes to rank k % world_size.
    """
    # SFT: the held-out loss covers assistant tokens only, as in training.
    columns = _columns(infos)
    readers = [_SplitReader(i.files["validation"], columns)
               for i in infos if i.rows["validation"] > 0 and i.files["validation"]]  # fmt: skip
    total = sum(len(r) for r in readers)
    per_rank = min(max_batches, total // (micro_batch * world_size))
    if per_rank == 0:
        return []
    picks = [(k * world_size + rank) * micro_batch for k in range(per_rank)]
    # Global validation position -> (reader, local position).
    bounds = np.cumsum([0] + [len(r) for r in readers])
    out = []
    for start in picks:
        pos = np.arange(start, start + micro_batch)
        which = np.searchsorted(bounds, pos, side="right") - 1
        parts = [readers[w].read(pos[which == w] - bounds[w]) for w in np.unique(which)]
        out.append({c: np.concatenate([p[c] for p in parts]) for c in parts[0]})
    return out
