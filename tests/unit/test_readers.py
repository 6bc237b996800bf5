import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.errors import DataError
from data_pipelines.readers import detect_format, expand_inputs, parse_file


def _reasons(records):
    return [(r.source, r.reason) for r in records]


def test_jsonl_line_level_accounting():
    data = (
        b'{"text": "a"}\n{bad\n\n{"body": "x"}\n"just a string"\n{"text": "caf\xff"}\n{"text": 5}\n'
    )
    recs = list(parse_file("f.jsonl", data, "auto"))
    assert _reasons(recs) == [
        ("f.jsonl:1", ""),
        ("f.jsonl:2", "malformed_json"),
        ("f.jsonl:4", "missing_text"),
        ("f.jsonl:5", "malformed_json"),
        ("f.jsonl:6", "invalid_utf8"),
        ("f.jsonl:7", "missing_text"),
    ]
    assert recs[0].payload == "a"


def test_gzip_text_field_and_extra_fields():
    rows = [{"body": "one", "meta": {"k": 1}}, {"body": "two", "lang": "en"}]
    blob = gzip.compress("\n".join(json.dumps(r) for r in rows).encode())
    recs = list(parse_file("x.jsonl.gz", blob, "auto", text_field="body"))
    assert [r.payload for r in recs] == ["one", "two"]


def test_parquet_and_text_units():
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": ["p1", None, "p3"], "n": [1, 2, 3]}), buf)
    recs = list(parse_file("t.parquet", buf.getvalue(), "auto"))
    assert _reasons(recs) == [
        ("t.parquet:1", ""),
        ("t.parquet:2", "missing_text"),
        ("t.parquet:3", ""),
    ]
    text = b"line one\n\nline two\n"
    assert [r.payload for r in parse_file("a.txt", text, "auto")] == ["line one\n\nline two\n"]
    assert [r.source for r in parse_file("a.txt", text, "auto", text_unit="line")] == [
        "a.txt:1",
        "a.txt:3",
    ]


def test_empty_file_and_messages():
    assert _reasons(parse_file("e.jsonl", b"  \n", "auto")) == [("e.jsonl", "empty_file")]
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    bad_role = {"messages": [{"role": "robot", "content": "hi"}]}
    ends_on_user = {"messages": good["messages"] + [{"role": "user", "content": "and?"}]}
    data = "\n".join(json.dumps(x) for x in (good, no_answer, bad_role, ends_on_user)).encode()
    recs = list(parse_file("c.jsonl", data, "auto", sft=True))
    assert [(r.source, r.reason) for r in recs] == [
        ("c.jsonl:1", ""),
        ("c.jsonl:2", "last_turn_not_assistant"),
        ("c.jsonl:3", "invalid_messages"),
        ("c.jsonl:4", "last_turn_not_assistant"),
    ]
    as_text = list(parse_file("c.jsonl", data, "auto", messages_as_text=True))
    assert as_text[0].payload == "hi\nyo"


def test_detect_format():
    assert detect_format("a/b.JSONL.GZ") == "jsonl"
    assert detect_format("x.parquet") == "parquet"
    assert detect_format("x.bin") is None
    assert detect_format("x.bin", "text") == "text"


def test_expand_inputs_sorts_and_names_bad_specs(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.jsonl", "a.jsonl", "skip.bin", ".hidden.jsonl"):
        (tmp_path / "d" / name).write_text('{"text": "x"}\n')
    files = expand_inputs([str(tmp_path / "d")])
    assert [p.rsplit("/", 1)[1] for p in files.paths] == ["a.jsonl", "b.jsonl"]
    same = expand_inputs([str(tmp_path / "d" / "b.jsonl"), str(tmp_path / "d" / "a.jsonl")])
    assert same.paths == files.paths
    assert len(expand_inputs([str(tmp_path / "d" / "*.jsonl")]).paths) == 2
    with pytest.raises(DataError, match=r"data.inputs\[1\]: .*missing: no such file"):
        expand_inputs([str(tmp_path / "d"), str(tmp_path / "missing")])
    with pytest.raises(DataError, match="unknown format"):
        expand_inputs([str(tmp_path / "d" / "skip.bin")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files"):
        expand_inputs([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="empty"):
        expand_inputs([])
