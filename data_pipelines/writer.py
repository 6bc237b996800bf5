"""Deterministic parquet shard writer: fixed rows per file, fixed schema, fixed options.

Same rows in the same order -> sha256-identical files, which the manifest records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.pack import PackedRow

__all__ = ["ShardWriter", "file_sha256", "row_schema", "rows_per_group"]


def row_schema(with_labels: bool) -> pa.Schema:
    fields = [
        pa.field("row_id", pa.int64()),
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("position_ids", pa.list_(pa.int32())),
    ]
    if with_labels:
        fields.append(pa.field("labels", pa.list_(pa.int32())))
    return pa.schema(fields)


def rows_per_group(list_columns: int, seq_len: int, target_bytes: int = 1 << 20) -> int:
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

    def __init__(self, directory: str | Path, rows_per_file: int, with_labels: bool):
        self.directory = Path(directory)
        self.rows_per_file = rows_per_file
        self.schema = row_schema(with_labels)
        self.with_labels = with_labels
        self.files: list[str] = []
        self.checksums: dict[str, str] = {}
        self.rows = 0
        self.tokens = 0
        self._pending: list[PackedRow] = []

    def add(self, row: PackedRow) -> None:
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
        columns = [
            pa.array(np.arange(first, first + len(rows), dtype=np.int64)),
            _list_column([r.input_ids for r in rows]),
            _list_column([r.position_ids for r in rows]),
        ]
        if self.with_labels:
            columns.append(_list_column([r.labels for r in rows]))
        table = pa.Table.from_arrays(columns, schema=self.schema)
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{len(self.files):05d}.parquet"
        path = self.directory / name
        pq.write_table(table, path, compression="zstd", write_statistics=False,
                       row_group_size=rows_per_group(table.num_columns - 1, len(rows[0].input_ids)))  # fmt: skip
        self.files.append(name)
        self.checksums[name] = file_sha256(path)
        self.rows += len(rows)
