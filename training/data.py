"""Deterministic per-rank data: which rows each rank trains on at each step, and reading them.

Why not Ray Data's ``streaming_split``: it hands blocks to ranks dynamically, so which rows a rank
sees depends on timing, ranks can get unequal batch counts (a collective then hangs), and a resume
cannot reproduce the order. Here the order is a pure function of (seed, epoch, dataset sizes,
weights, world size, rank): every rank computes the same global order and takes its slice.

How rows are read: each rank reads the prepared parquet directly with pyarrow from the shared
prepared dir (the same every-node-reachable storage the run dir needs), step by step: an index
from position to (file, row group) built from the row_id column and the footers, the row groups a
step needs decoded (a few kept), and a thread reading the next steps while the current one trains.
Memory is the index (about 20 bytes per row) plus a few row groups, whatever the dataset size; a
mid-epoch resume reads nothing it skips. That is the simplest reader that is exactly reproducible;
Ray Data would add a second scheduler whose block order we would then have to undo.

Mixing: dataset i contributes ``n_i = floor(total * w_i / sum(w))`` samples per epoch (total = sum
of dataset sizes), drawn from its own endless stream of seeded permutations (a dataset sampled below
its size continues where it stopped next epoch; above its size it repeats only after a full pass).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.writer import PREFERENCE_COLUMNS as PAIR_COLUMNS
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

log = logging.getLogger(__name__)


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
    mode: str = "pretrain"  # data.mode it was prepared with: pretrain, sft or preference
    layouts: dict[str, list[list[int]]] = field(default_factory=dict)  # split -> [rows, group rows]
    arrays: dict[str, list[str]] = field(default_factory=dict)  # split -> absolute Arrow copies


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
        mode=str(manifest.get("mode", "sft" if has_labels else "pretrain")),
        layouts={
            s: splits[s]["layout"]
            for s in ("train", "validation")
            if splits.get(s, {}).get("layout")
        },  # fmt: skip
        arrays={
            s: [str(root / s / n) for n in splits[s]["arrays"]]
            for s in ("train", "validation")
            if splits.get(s, {}).get("arrays")
        },  # fmt: skip
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


def _list_rows(col: Any) -> np.ndarray:
    """A list<int32> column of rows of any length (preference pairs, unpadded) as a (rows,) object
    array of int32 arrays, each a view of its chunk's values buffer."""
    out = np.empty(len(col), dtype=object)
    k = 0
    for chunk in col.chunks:
        offsets = chunk.offsets.to_numpy()
        flat = chunk.values.to_numpy(zero_copy_only=False)
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            out[k] = flat[a:b]
            k += 1
    return out


def _list_matrix(col: Any) -> np.ndarray:
    """A list<int32> column of fixed-length rows (exactly seq_len) as a (rows, seq) int32 array:
    views of each chunk's values buffer, no per-row objects (combine/flatten cost ~1 ms a group)."""
    parts = []
    for chunk in col.chunks:
        offsets = chunk.offsets.to_numpy()
        flat = chunk.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
        parts.append(flat.reshape(len(chunk), -1))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class _ArrowCopy:
    """One file's Arrow copy (``data prepare``'s ``part-NNNNN.arrow``: one uncompressed record
    batch), whose rows are read with ``pread`` at their buffers' offsets in the file: no decoding,
    only the wanted rows' bytes read, nothing mapped into the process (the OS's page cache keeps
    what was read, shared by every rank of a node)."""

    def __init__(self, path: str, columns: list[str], ragged: bool):
        self.path, self.ragged, self.fd = path, ragged, -1
        source = pa.memory_map(path)  # to find the buffers' offsets: only the metadata is read
        try:
            self._find_buffers(source, columns)
        except (pa.ArrowInvalid, KeyError) as exc:
            raise TrainConfigError(f"{path}: not an Arrow copy as data prepare writes it ({exc}); "
                                   "delete it to read the parquet instead") from None  # fmt: skip
        finally:
            source.close()
        self.fd = os.open(path, os.O_RDONLY)

    def _find_buffers(self, source: Any, columns: list[str]) -> None:
        ipc = pa.ipc.open_file(source)
        if ipc.num_record_batches != 1:
            raise TrainConfigError(
                f"{self.path}: {ipc.num_record_batches} record batches where data prepare writes "
                "one (delete it to read the parquet instead)"
            )
        batch = ipc.get_batch(0)
        source.seek(0)
        base = source.read_buffer(1).address
        # column -> (values offset in the file, row offsets (rows + 1,) int32); row_id is read
        # whole (8 bytes a row): it says which row a read returned
        self.where: dict[str, tuple[int, np.ndarray]] = {}
        for c in columns:
            col = batch.column(c)
            ids = c == "row_id"
            int32_lists = pa.types.is_list(col.type) and col.type.value_type == pa.int32()
            written = col.type == pa.int64() if ids else int32_lists
            if col.null_count or col.offset or not written:
                raise TrainConfigError(f"{self.path}: column {c} is not as data prepare writes it")
            # The buffers as numpy, not to_numpy(): pyarrow's first to_numpy imports pandas
            # (0.9 s of a worker's start on 2 cores, measured)
            rows = len(col)
            if ids:
                self.row_ids = np.frombuffer(col.buffers()[1], np.int64, rows).copy()
            else:
                offsets = np.frombuffer(col.buffers()[1], np.int32, rows + 1).copy()
                self.where[c] = (col.buffers()[3].address - base, offsets)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def _read(self, buf: Any, offset: int) -> None:
        if os.preadv(self.fd, [buf], offset) != memoryview(buf).nbytes:
            raise TrainConfigError(f"{self.path}: truncated (re-run `raylm data prepare`)")

    def empty(self, n: int) -> dict[str, np.ndarray]:
        """Arrays for ``n`` rows of every column, for :meth:`read_row` to fill."""
        out: dict[str, np.ndarray] = {"row_id": np.empty(n, dtype=np.int64)}
        for c, (_, offsets) in self.where.items():
            if self.ragged:
                out[c] = np.empty(n, dtype=object)
            else:
                out[c] = np.empty((n, int(offsets[1] - offsets[0])), dtype=np.int32)
        return out

    def read_row(self, row: int, out: dict[str, np.ndarray], i: int) -> None:
        """Row ``row`` of this file into ``out[column][i]``: one pread per list column, straight
        into the array for fixed-width ones."""
        out["row_id"][i] = self.row_ids[row]
        for c, (values, offsets) in self.where.items():
            start, end = int(offsets[row]), int(offsets[row + 1])
            if self.ragged:
                out[c][i] = np.empty(end - start, dtype=np.int32)
            elif end - start != out[c].shape[1]:
                raise TrainConfigError(f"{self.path}: {c} rows of {end - start} tokens where "
                                       f"the dataset's have {out[c].shape[1]}")  # fmt: skip
            self._read(out[c][i], values + 4 * start)


class _SplitReader:
    """Rows of one dataset split, addressed by position in ascending row_id order, read per step.

    Where a row lives comes from the manifest's ``layout`` (rows and rows per row group of each
    file, row_ids running on from file to file): nothing is read up front. Outputs without one
    are indexed from each file's ``row_id`` column and footer (8 bytes per row).

    With the files' Arrow copies (``arrays``, written by ``data prepare`` unless
    ``data.arrow_copy`` is off), a read ``pread``s just the wanted rows' bytes
    (:class:`_ArrowCopy`). Otherwise a read decodes just the parquet row groups holding the wanted
    rows, keeping the last few decoded (``cache_groups``); ``data prepare`` writes row groups of
    about 256 KB. Either way memory does not grow with the dataset.

    ``columns`` may name ``labels`` for a dataset without them (a pretraining dataset mixed into
    SFT): its labels are then its input_ids, so every real next token carries loss (``loss_targets``
    still masks padding and document starts).

    Preference rows (``chosen_*``/``rejected_*`` columns) have no fixed length: those columns come
    back as (rows,) object arrays of int32 arrays. ``extra`` columns, one value per row in
    ascending row_id order (precomputed reference log-probs), are joined to what is read.
    """

    def __init__(
        self,
        files: list[str],
        columns: list[str],
        layout: list[list[int]] | None = None,
        cache_groups: int = 16,
        extra: dict[str, np.ndarray] | None = None,
        arrays: list[str] | None = None,
        cache_files: int = 64,
    ):
        self.paths = files
        self.ragged = any(c in PAIR_COLUMNS for c in columns)
        self.extra = extra or {}
        first = pq.ParquetFile(files[0])
        self.fill_labels = "labels" in columns and "labels" not in first.schema_arrow.names
        self.columns = [c for c in columns if not (c == "labels" and self.fill_labels)]
        if layout and len(layout) == len(files):
            # The manifest's [rows, rows per group] per file, row_ids running on from file to
            # file: nothing to read up front, whatever the dataset size.
            rows = np.asarray([r for r, _ in layout], dtype=np.int64)
            self._starts = np.concatenate([[0], np.cumsum(rows)])
            self._group_rows = np.asarray([g for _, g in layout], dtype=np.int64)
            self._size = int(self._starts[-1])
            self._file = self._group = self._row = None
        else:
            self._index_from_files()
        self._cache: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self._cache_groups = cache_groups
        self.arrays = arrays if layout and arrays else None
        if self.arrays and (len(self.arrays) != len(files)
                            or not all(Path(a).is_file() for a in self.arrays)):  # fmt: skip
            log.warning("%s: Arrow copies listed in the manifest are missing; reading the "
                        "parquet files instead", Path(files[0]).parent)  # fmt: skip
            self.arrays = None
        self._copies: OrderedDict[int, _ArrowCopy] = OrderedDict()
        self._cache_files = cache_files
        self._lock = threading.Lock()  # the prefetch thread and eval may read concurrently
        for name, values in self.extra.items():
            if len(values) != self._size:
                raise TrainConfigError(f"{Path(files[0]).parent}: {name} has {len(values)} rows, "
                                       f"the split {self._size}")  # fmt: skip

    def _index_from_files(self) -> None:
        """Outputs without a layout in the manifest: the row_id column and footers of every file."""
        ids, file_of, group_of, row_of = [], [], [], []
        for k, path in enumerate(self.paths):
            pf = pq.ParquetFile(path)
            file_ids = pf.read(columns=["row_id"])["row_id"].to_numpy()
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            ids.append(file_ids)
            file_of.append(np.full(len(file_ids), k, dtype=np.int32))
            group_of.append(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
            row_of.append(np.concatenate([np.arange(n, dtype=np.int32) for n in sizes]))
        all_ids = np.concatenate(ids)
        order = np.argsort(all_ids, kind="stable")
        sorted_ids = all_ids[order]
        if np.any(sorted_ids[1:] == sorted_ids[:-1]):
            raise TrainConfigError(f"{Path(self.paths[0]).parent}: duplicate row_id values")
        # position -> where the row lives; (n,) int32 each
        self._file = np.concatenate(file_of)[order]
        self._group = np.concatenate(group_of)[order]
        self._row = np.concatenate(row_of)[order]
        self._size = len(sorted_ids)

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(file, row group, row in group) of each position in ascending row_id order."""
        if self._file is not None:
            return self._file[positions], self._group[positions], self._row[positions]
        files = np.searchsorted(self._starts, positions, side="right") - 1
        groups, rows = np.divmod(positions - self._starts[files], self._group_rows[files])
        return files, groups, rows

    def __len__(self) -> int:
        return self._size

    def _decoded(self, file: int, group: int) -> dict[str, np.ndarray]:
        """One row group as numpy: row_id (n,) int64, list columns (n, seq) int32."""
        key = (file, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = pq.ParquetFile(self.paths[file]).read_row_group(group, columns=self.columns)
        out = {}
        lists = _list_rows if self.ragged else _list_matrix
        for c in self.columns:
            out[c] = table[c].to_numpy() if c == "row_id" else lists(table[c])
        self._cache[key] = out
        if len(self._cache) > self._cache_groups:
            self._cache.popitem(last=False)
        return out

    def _copy(self, file: int) -> _ArrowCopy:
        """The file's Arrow copy, opened once; the last ``cache_files`` stay open."""
        if file in self._copies:
            self._copies.move_to_end(file)
            return self._copies[file]
        path = self.arrays[file]  # type: ignore[index]
        self._copies[file] = _ArrowCopy(path, self.columns, self.ragged)
        if len(self._copies) > self._cache_files:
            self._copies.popitem(last=False)[1].close()
        return self._copies[file]

    def _copied_rows(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``positions`` from the Arrow copies, row by row."""
        files = self._locate(positions)[0]
        in_file = positions - self._starts[files]
        out: dict[str, np.ndarray] = {}
        for i, (f, row) in enumerate(zip(files.tolist(), in_file.tolist(), strict=True)):
            copy = self._copy(f)
            out = out or copy.empty(len(positions))
            copy.read_row(row, out, i)
        return out

    def _decoded_rows(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``positions`` from the parquet files, each row group decoded once."""
        files, groups, rows = self._locate(positions)
        out: dict[str, np.ndarray] = {}
        for f, g in sorted(set(zip(files.tolist(), groups.tolist(), strict=True))):
            hit = (files == f) & (groups == g)
            for c, arr in self._decoded(f, g).items():
                if c not in out:
                    out[c] = np.zeros((len(positions),) + arr.shape[1:], dtype=arr.dtype)
                out[c][hit] = arr[rows[hit]]
        return out

    def read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at ``positions`` (any order, repeats allowed)."""
        positions = np.asarray(positions, dtype=np.int64)
        with self._lock:
            out = self._copied_rows(positions) if self.arrays else self._decoded_rows(positions)
        if self.fill_labels:
            out["labels"] = out["input_ids"].copy()
        for name, values in self.extra.items():
            out[name] = values[positions]
        return out


def _columns(infos: list[DatasetInfo]) -> list[str]:
    """Columns every micro-batch carries: ``labels`` when any dataset has them (SFT, possibly with
    pretraining datasets mixed in to keep the base model's language ability); preference datasets
    (DPO takes only those) their pair columns."""
    if any(i.mode == "preference" for i in infos):
        return ["row_id", *PAIR_COLUMNS]
    base = ["row_id", "input_ids", "position_ids"]
    return base + ["labels"] if any(i.has_labels for i in infos) else base


def _reader(
    info: DatasetInfo, split: str, columns: list[str], reference: str | None
) -> _SplitReader:
    """A split's reader; ``reference``: a precomputed reference dir whose log-probs join the rows."""
    extra = None
    if reference:
        from training.reference import read_reference

        extra = read_reference(reference, split)
    return _SplitReader(info.files[split], columns, info.layouts.get(split), extra=extra,
                        arrays=info.arrays.get(split))  # fmt: skip


class MixedRows:
    """One rank's view of the mixed training data: per-step micro-batches, from any start step.

    ``references``: per dataset, the dir of its precomputed reference log-probs (DPO), or None.
    """

    def __init__(self, infos: list[DatasetInfo], weights: list[float], seed: int,
                 global_rows: int, micro_batch: int, world_size: int, rank: int,
                 references: list[str] | None = None):  # fmt: skip
        self.columns = _columns(infos)
        refs = references or [None] * len(infos)
        self.readers = [_reader(i, "train", self.columns, r)
                        for i, r in zip(infos, refs, strict=True)]  # fmt: skip
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

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        """This rank's (dataset, position) pairs for ``epoch``: (steps, rows_per_rank, 2) int64.
        Positions only (16 bytes per row); the rows themselves are read step by step."""
        order = epoch_order(epoch, self.seed, self.sizes, self.weights)
        return shard_epoch(order, self.global_rows, self.world_size, self.rank).rows

    def read_step(self, pairs: np.ndarray) -> list[dict[str, np.ndarray]]:
        """One step's micro-batches from its (rows_per_rank, 2) (dataset, position) pairs."""
        rows: dict[str, np.ndarray] = {}
        for i, reader in enumerate(self.readers):
            sel = pairs[:, 0] == i
            if not sel.any():
                continue
            for c, arr in reader.read(pairs[sel, 1]).items():
                if c not in rows:
                    rows[c] = np.zeros((len(pairs),) + arr.shape[1:], dtype=arr.dtype)
                rows[c][sel] = arr
        return [{c: a[m : m + self.micro_batch] for c, a in rows.items()}
                for m in range(0, len(pairs), self.micro_batch)]  # fmt: skip

    def _step_pairs(self, start_step: int, end_step: int) -> Iterator[np.ndarray]:
        epoch, shard = -1, np.empty((0, 0, 2), dtype=np.int64)
        for step in range(start_step, end_step):
            e, s = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, shard = e, self._epoch_rows(e)
            yield shard[s]

    def iter_steps(
        self, start_step: int, end_step: int, prefetch: int = 2
    ) -> Iterator[list[dict[str, np.ndarray]]]:
        """For each global step in [start_step, end_step): its micro-batches for this rank.

        A background thread reads up to ``prefetch`` steps ahead (parquet decoding releases the
        GIL), so reading overlaps the forward and backward of the current step.
        """
        pairs = self._step_pairs(start_step, end_step)
        if prefetch <= 0:
            yield from (self.read_step(p) for p in pairs)
            return
        yield from _prefetched((self.read_step(p) for p in pairs), prefetch)


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items`` produced by a daemon thread at most ``depth`` ahead; its errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer
            q.put((done, exc))

    thread = threading.Thread(target=produce, name="raylm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early (preemption, error): let the thread end


def validation_batches(
    infos: list[DatasetInfo],
    micro_batch: int,
    world_size: int,
    rank: int,
    max_batches: int,
    references: list[str] | None = None,
) -> list[dict[str, np.ndarray]]:
    """This rank's held-out micro-batches: the same count on every rank (eval is a collective).

    Validation rows of all datasets in row_id order; micro-batch k goes to rank k % world_size.
    """
    # SFT: the held-out loss covers assistant tokens only, as in training.
    columns = _columns(infos)
    refs = references or [None] * len(infos)
    readers = [_reader(i, "validation", columns, r) for i, r in zip(infos, refs, strict=True)
               if i.rows["validation"] > 0 and i.files["validation"]]  # fmt: skip
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
