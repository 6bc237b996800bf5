"""Deterministic parquet shard writer: fixed rows per file, fixed schema, fixed options.

Same rows in the same order -> sha256-identical files, which the manifest records. Next to each
``part-NNNNN.parquet`` it can write ``part-NNNNN.arrow``: the same table as one uncompressed Arrow
IPC record batch, from which training reads any row's bytes without decoding
(``training.data._ArrowCopy``; the parquet stays the interchange format: Ray Data, pandas, a
user's own tools).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.pack import PackedRow, PairRow

__all__ = ["PREFERENCE_COLUMNS", "ShardWriter", "file_sha256", "row_schema", "rows_per_group"]

# Preference rows (data.mode: preference): one pair per row, each side unpadded.
PREFERENCE_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def _token_columns(with_labels: bool) -> tuple[str, ...]:
    return ("input_ids", "position_ids", "labels") if with_labels else ("input_ids", "position_ids")


def row_schema(with_labels: bool, columns: tuple[str, ...] | None = None) -> pa.Schema:
    """row_id int64, then one list<int32> per token column (packed rows by default)."""
    names = columns or _token_columns(with_labels)
    return pa.schema([pa.field("row_id", pa.int64())]
                     + [pa.field(n, pa.list_(pa.int32())) for n in names])  # fmt: skip


def rows_per_group(list_columns: int, seq_len: int, target_bytes: int = 1 << 18) -> int:
    """Rows per parquet row group so one group holds about ``target_bytes`` of int32 tokens:
    training reads rows at random positions one row group at a time (``training.data``)."""
    return max(1, min(4096, target_bytes // max(1, 4 * seq_len * list_columns)))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _list_column(rows: list[np.ndarray]) -> pa.ListArray:
    flat = np.concatenate(rows).astype(np.int32, copy=False)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


class ShardWriter:
    """Writes one split as ``part-00000.parquet``, ``part-00001.parquet``, ... under ``directory``."""

    def __init__(
        self,
        directory: str | Path,
        rows_per_file: int,
        with_labels: bool,
        columns: tuple[str, ...] | None = None,
        arrow_copy: bool = False,
    ):
        self.directory = Path(directory)
        self.arrow_copy = arrow_copy
        self.arrays: list[str] = []  # the Arrow copies' names, one per file when arrow_copy
        self.rows_per_file = rows_per_file
        self.columns = columns or _token_columns(with_labels)
        self.schema = row_schema(with_labels, self.columns)
        self.files: list[str] = []
        # per file [rows, rows per row group]; row_ids run on from file to file (first = rows so
        # far), so a reader finds any row from this alone (training.data)
        self.layout: list[list[int]] = []
        self.checksums: dict[str, str] = {}
        self.rows = 0
        self.tokens = 0
        self._pending: list[PackedRow | PairRow] = []

    def add(self, row: PackedRow | PairRow) -> None:
        self._pending.append(row)
        self.tokens += row.real_tokens
        if len(self._pending) >= self.rows_per_file:
            self._flush()

    def close(self) -> None:
        if self._pending:
            self._flush()

    def _flush(self) -> None:
        rows, self._pending = self._pending, []
        first = self.rows
        columns = [pa.array(np.arange(first, first + len(rows), dtype=np.int64))]
        columns += [_list_column([getattr(r, c) for r in rows]) for c in self.columns]
        table = pa.Table.from_arrays(columns, schema=self.schema)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{len(self.files):05d}.parquet"
        path = self.directory / name
        longest = max(len(getattr(r, self.columns[0])) for r in rows)
        group = rows_per_group(len(self.columns), longest)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", write_statistics=False,
                       row_group_size=group)  # fmt: skip
        self.files.append(name)
        self.layout.append([len(rows), group])
        self.checksums[name] = _write_hashed(path, sink.getvalue())
        if self.arrow_copy:
            copy = path.with_suffix(".arrow")
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, self.schema) as ipc:
                ipc.write_batch(table.combine_chunks().to_batches()[0])
            self.arrays.append(copy.name)
            self.checksums[copy.name] = _write_hashed(copy, sink.getvalue())
        self.rows += len(rows)


def _write_hashed(path: Path, data: pa.Buffer) -> str:
    """Write one file's serialized bytes and return their sha256, without reading the file back
    (the table they encode is in memory already; the file's bytes are what a file sink gets)."""
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()
