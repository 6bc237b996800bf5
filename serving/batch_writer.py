"""The parquet files ``raylm generate`` writes: input columns, results, one schema for all files.

Rows arrive in input order and are written as they come, ``rows_per_file`` to a file
(``part-00000.parquet``, ...), so the driver holds one file's rows at most. Columns: ``source``
("file:line"), the input row's own fields (types as their JSON values; an input field named like
a result column is kept as ``input.NAME``), the mode's result columns, ``error``.

Input rows need not agree on their fields: each file's columns are inferred from its rows, and on
close every file is brought to one schema: a field missing from a file is null there, numbers
widen (int to float), and a field whose values have different JSON types (a number here, a string
there) is written as JSON text everywhere. Only files that differ from that schema are rewritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.writer import file_sha256

__all__ = ["RESULT_TYPES", "ResultWriter"]

RESULT_TYPES = {
    "generated_text": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "finish_reason": pa.string(),
    "completion_logprob": pa.float64(),
    "completion_token_logprobs": pa.list_(pa.float64()),
    "error": pa.string(),
}


@dataclass
class _Part:
    name: str
    schema: pa.Schema
    as_json: set[str] = field(default_factory=set)  # input columns written as JSON text here


def _py(value):
    """numpy scalars and arrays (as Ray Data hands them back) as Python values."""
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


def _as_json(values: list) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                    pa.string())  # fmt: skip


def _input_column(values: list) -> tuple[pa.Array, bool]:
    """Values of one input field -> (arrow array, written as JSON text)."""
    kinds = {type(v) for v in values if v is not None} - {int, float}
    numbers = any(type(v) in (int, float) for v in values)
    if len(kinds) + numbers <= 1:
        try:
            return pa.array(values), False
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            pass  # lists of mixed items, nested objects of different shapes, huge ints
    return _as_json(values), True


class ResultWriter:
    """Writes rows (source, input record, results) in order; ``close`` returns the file names."""

    def __init__(self, directory: str | Path, rows_per_file: int, results: tuple[str, ...]) -> None:
        self.directory = Path(directory)
        self.rows_per_file = rows_per_file
        self.results = (*results, "error")
        self.parts: list[_Part] = []
        self.rows = 0
        self._pending: list[tuple[str, dict | None, tuple]] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """A batch of ``source``, ``record`` (the row as JSON, "" if unreadable), results and
        ``error`` ("" if none); a row with an error gets null results."""
        columns = [batch[c] for c in self.results[:-1]]
        for i, source in enumerate(batch["source"]):
            record = json.loads(batch["record"][i]) if batch["record"][i] else None
            error = str(batch["error"][i] or "")
            if error:
                results = (None,) * len(columns) + (error,)
            else:
                results = tuple(_py(c[i]) for c in columns) + (None,)
            self._pending.append((str(source), record, results))
            if len(self._pending) >= self.rows_per_file:
                self._flush()

    def close(self) -> list[str]:
        if self._pending:
            self._flush()
        self._unify()
        return [p.name for p in self.parts]

    def checksums(self) -> dict[str, str]:
        return {p.name: file_sha256(self.directory / p.name) for p in self.parts}

    def _input_name(self, key: str) -> str:
        return f"input.{key}" if key in self.results or key == "source" else key

    def _flush(self) -> None:
        rows, self._pending = self._pending, []
        keys = list(dict.fromkeys(k for _, record, _ in rows for k in record or {}))
        arrays, names, as_json = [pa.array([s for s, _, _ in rows], pa.string())], ["source"], set()
        for key in keys:
            array, encoded = _input_column([(r or {}).get(key) for _, r, _ in rows])
            name = self._input_name(key)
            arrays.append(array)
            names.append(name)
            if encoded:
                as_json.add(name)
        for j, column in enumerate(self.results):
            arrays.append(pa.array([res[j] for _, _, res in rows], RESULT_TYPES[column]))
            names.append(column)
        table = pa.Table.from_arrays(arrays, names=names)
        part = _Part(f"part-{len(self.parts):05d}.parquet", table.schema, as_json)
        self._write(part, table)
        self.parts.append(part)
        self.rows += len(rows)

    def _write(self, part: _Part, table: pa.Table) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, self.directory / part.name, compression="zstd")
        part.schema = table.schema

    def _target(self) -> tuple[pa.Schema, set[str]]:
        """The schema every file gets, and the input columns written as JSON text."""
        fixed = {"source", *self.results}
        order = list(dict.fromkeys(n for p in self.parts for n in p.schema.names if n not in fixed))
        as_json = set().union(*(p.as_json for p in self.parts)) if self.parts else set()
        fields = [pa.field("source", pa.string())]
        for name in order:
            types = [p.schema.field(name).type for p in self.parts if name in p.schema.names]
            typed = [t for t in types if t != pa.null()] or [pa.null()]
            try:
                kind = pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in typed],
                                        promote_options="permissive").field(name).type  # fmt: skip
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                as_json.add(name)
            fields.append(pa.field(name, pa.string() if name in as_json else kind))
        fields += [pa.field(c, RESULT_TYPES[c]) for c in self.results]
        return pa.schema(fields), as_json

    def _unify(self) -> None:
        target, as_json = self._target()
        for part in self.parts:
            native = {n for n in as_json - part.as_json if n in part.schema.names}
            if part.schema.equals(target) and not native:
                continue
            table = pq.read_table(self.directory / part.name)
            arrays = []
            for f in target:
                if f.name not in table.column_names:
                    arrays.append(pa.nulls(table.num_rows, f.type))
                elif f.name in as_json and f.name not in part.as_json:
                    arrays.append(_as_json(table.column(f.name).to_pylist()))
                else:
                    arrays.append(table.column(f.name).cast(f.type))
            part.as_json |= as_json
            self._write(part, pa.Table.from_arrays(arrays, schema=target))
