"""`raylm generate`'s first stage without Ray or a model: input files -> rows with their file:line,
checked fields and resolved sampling parameters, or the row's one-line error."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.batch import RowError, iter_rows, parse_files, row_sampling
from serving.config import GenerateConfig

LINES = [
    json.dumps({"id": 1, "prompt": "Ben was"}),
    "",
    "{not json",
    json.dumps({"id": 3, "messages": [{"role": "user", "content": "hi"}]}),
    "[1, 2]",
]


def _jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def test_jsonl_rows_keep_their_line_numbers_and_errors():
    data = _jsonl(LINES) + b"\xff\xfe\n"
    rows = list(iter_rows("in.jsonl", data, "jsonl"))
    assert [r.source for r in rows] == ["in.jsonl:1", "in.jsonl:3", "in.jsonl:4", "in.jsonl:5",
                                        "in.jsonl:6"]  # fmt: skip
    assert rows[0].record == {"id": 1, "prompt": "Ben was"} and not rows[0].error
    assert rows[1].record is None and rows[1].error.startswith("malformed JSON (")
    assert rows[3].error == "not a JSON object (a list)"
    assert rows[4].error == "invalid UTF-8"
    zipped = list(iter_rows("in.jsonl.gz", gzip.compress(data), "jsonl"))
    assert [(r.line, r.record, r.error) for r in zipped] == [(r.line, r.record, r.error)
                                                             for r in rows]  # fmt: skip


def test_parquet_rows_are_numbered_from_one_and_a_broken_file_is_one_error_row():
    table = pa.table({"prompt": ["a", "b", None], "max_tokens": [3, None, 5]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    rows = list(iter_rows("p.parquet", buf.getvalue(), "parquet"))
    assert [r.source for r in rows] == ["p.parquet:1", "p.parquet:2", "p.parquet:3"]
    assert rows[1].record == {"prompt": "b", "max_tokens": None}
    (bad,) = iter_rows("p.parquet", b"not parquet at all", "parquet")
    assert bad.source == "p.parquet:0" and bad.error.startswith("not a readable parquet file")


def test_row_columns_override_the_configs_sampling():
    cfg = GenerateConfig(sampling={"max_tokens": 9, "temperature": 0.0, "stop": ["\n"]})
    p = row_sampling({"prompt": "x"}, cfg)
    assert (p.max_tokens, p.temperature, p.stop, p.seed) == (9, 0.0, ("\n",), None)
    p = row_sampling({"max_tokens": 3, "temperature": 1, "top_p": 0.5, "seed": 7, "stop": "."}, cfg)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop) == (3, 1.0, 0.5, 7, (".",))
    assert row_sampling({"temperature": None}, cfg).temperature == 0.0  # null: the config's
    off = cfg.model_copy(update={"row_sampling": False})
    assert row_sampling({"max_tokens": 3}, off).max_tokens == 9


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"max_tokens": True}, "`max_tokens` must be an integer (got True)"),
        ({"max_tokens": 2.5}, "`max_tokens` must be an integer (got 2.5)"),
        ({"max_tokens": 0}, "`max_tokens` must be >= 1 (got 0)"),
        ({"temperature": "0.5"}, "`temperature` must be a number (got '0.5')"),
        ({"temperature": 3.5}, "`temperature` must be in [0, 2] (got 3.5)"),
        ({"top_p": 0}, "`top_p` must be in (0, 1] (got 0)"),
        ({"stop": ["", "x"]}, "`stop` takes non-empty strings (got ['', 'x'])"),
        ({"stop": 4}, "`stop` must be a string or a list of up to 16 (got 4)"),
        ({"seed": 2**70}, "`seed` must fit in 64 bits"),
        ({"ignore_eos": "yes"}, "`ignore_eos` must be true or false (got 'yes')"),
    ],
)
def test_invalid_sampling_values_name_the_field(record, message):
    with pytest.raises(RowError) as err:
        row_sampling(record, GenerateConfig())
    assert str(err.value).startswith(message)


def _parse(lines: list[str], **cfg) -> dict[str, np.ndarray]:
    config = GenerateConfig(**cfg)
    batch = {"path": np.array(["/d/in.jsonl"], dtype=object),
             "bytes": np.array([_jsonl(lines)], dtype=object)}  # fmt: skip
    chunks = list(parse_files(batch, config, {"/d/in.jsonl": ("in.jsonl", 2, "jsonl")}))
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def test_parse_files_checks_each_row_and_keeps_input_order():
    rows = [
        {"prompt": "a", "temperature": 0},
        {"prompt": "b", "messages": [{"role": "user", "content": "x"}]},
        {"text": "no prompt"},
        {"messages": [{"role": "user"}]},
        {"prompt": 5},
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
                      {"role": "user", "content": "hi"}]},
    ]  # fmt: skip
    out = _parse([json.dumps(r) for r in rows] + ["{oops"], batch_size=2)
    assert list(out["key"]) == [(2 << 32) | line for line in range(1, 8)]
    assert list(out["error"]) == [
        "",
        "in.jsonl:2: both `prompt` and `messages`; give one",
        "in.jsonl:3: no `prompt` or `messages` field",
        "in.jsonl:4: `messages[0]` must be an object with string `role` and `content`",
        "in.jsonl:5: `prompt` must be a string (got int)",
        "",
        "in.jsonl:7: malformed JSON (Expecting property name enclosed in double quotes: line 1 "
        "column 2 (char 1))",
    ]
    assert json.loads(out["params"][0])["temperature"] == 0
    assert json.loads(out["messages"][5]) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert json.loads(out["record"][2]) == {"text": "no prompt"} and out["record"][6] == ""


def test_score_rows_need_a_completion_and_ignore_sampling():
    out = _parse([json.dumps({"prompt": "a", "completion": " b", "temperature": 9}),
                  json.dumps({"prompt": "a"})], mode="score")  # fmt: skip
    assert list(out["error"]) == [
        "", "in.jsonl:2: `completion` must be a non-empty string (score mode)"
    ]  # fmt: skip
    assert out["completion"][0] == " b" and out["params"][0] == ""


def test_config_refuses_empty_stop_strings():
    with pytest.raises(ValueError, match="empty strings would stop every row"):
        GenerateConfig(sampling={"stop": [""]})
