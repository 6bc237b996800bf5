"""The parquet files of `raylm generate`: rows in order, input fields as columns, one schema for every
file even when rows disagree on their fields or types."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from serving.batch import RESULT_COLUMNS
from serving.batch_writer import ResultWriter

RESULTS = RESULT_COLUMNS["generate"]


def _batch(records: list[dict | None], start: int = 1) -> dict[str, np.ndarray]:
    n = len(records)
    out = {
        "source": [f"in.jsonl:{start + i}" for i in range(n)],
        "record": [json.dumps(r) if r is not None else "" for r in records],
        "generated_text": [f"out {start + i}" for i in range(n)],
        "finish_reason": ["length"] * n,
        "error": ["" if r is not None else "in.jsonl: malformed JSON" for r in records],
    }
    typed = {"prompt_tokens": np.full(n, 3), "completion_tokens": np.full(n, 5)}
    return {**{k: np.asarray(v, dtype=object) for k, v in out.items()}, **typed}


def _read(writer: ResultWriter, names: list[str]) -> list[pa.Table]:
    return [pq.read_table(writer.directory / n) for n in names]


def test_rows_keep_their_order_and_fields_across_files(tmp_path):
    writer = ResultWriter(tmp_path, rows_per_file=3, results=RESULTS)
    writer.add(_batch([{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}]))
    writer.add(_batch([None, {"id": 4, "prompt": "d", "error": "theirs"}], start=3))
    writer.add(_batch([{"id": 5, "prompt": "e"}], start=5))
    names = writer.close()
    assert names == ["part-00000.parquet", "part-00001.parquet"] and writer.rows == 5
    tables = _read(writer, names)
    assert tables[0].schema == tables[1].schema
    assert tables[0].schema.names == ["source", "id", "prompt", "input.error", *RESULTS, "error"]
    rows = pa.concat_tables(tables).to_pylist()
    assert [r["source"] for r in rows] == [f"in.jsonl:{i}" for i in range(1, 6)]
    assert [r["id"] for r in rows] == [1, 2, None, 4, 5]
    assert rows[2]["error"] == "in.jsonl: malformed JSON" and rows[2]["generated_text"] is None
    assert rows[3]["input.error"] == "theirs" and rows[3]["error"] is None
    assert rows[4]["generated_text"] == "out 5" and rows[4]["completion_tokens"] == 5


def test_a_field_with_mixed_types_becomes_json_text_in_every_file(tmp_path):
    writer = ResultWriter(tmp_path, rows_per_file=2, results=RESULTS)
    writer.add(_batch([{"id": 1, "score": 1, "tags": ["a"]}, {"id": 2, "score": 2.5}]))
    writer.add(_batch([{"id": "x3", "score": 3, "tags": None}, {"id": "x4"}], start=3))
    writer.add(_batch([{"id": 5, "meta": {"k": 1}}, {"id": 6, "meta": {"k": [2]}}], start=5))
    tables = _read(writer, writer.close())
    assert all(t.schema == tables[0].schema for t in tables)
    schema = tables[0].schema
    assert schema.field("id").type == pa.string()  # ints here, strings there: JSON text
    assert schema.field("score").type == pa.float64()  # ints and floats: numbers
    assert schema.field("tags").type == pa.list_(pa.string())
    rows = pa.concat_tables(tables).to_pylist()
    assert [r["id"] for r in rows] == ["1", "2", '"x3"', '"x4"', "5", "6"]
    assert [r["score"] for r in rows] == [1.0, 2.5, 3.0, None, None, None]
    assert [r["meta"] for r in rows] == [None] * 4 + ['{"k": 1}', '{"k": [2]}']
