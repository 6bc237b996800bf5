import gzip
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.errors import DataError
from data_pipelines.formats import RecordFields
from data_pipelines.readers import detect_format, expand_inputs, parse_file

SFT = RecordFields(mode="sft")


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
    recs = list(parse_file("x.jsonl.gz", blob, "auto", RecordFields(text="body")))
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
    not_text = {"messages": [{"role": "user", "content": 5}]}
    rows = (good, no_answer, bad_role, ends_on_user, not_text)
    data = "\n".join(json.dumps(x) for x in rows).encode()
    recs = list(parse_file("c.jsonl", data, "auto", SFT))
    assert [(r.source, r.reason) for r in recs] == [
        ("c.jsonl:1", ""),
        ("c.jsonl:2", "last_turn_not_assistant"),
        ("c.jsonl:3", "unknown_role"),
        ("c.jsonl:4", "last_turn_not_assistant"),
        ("c.jsonl:5", "invalid_messages"),
    ]
    assert "messages[0].role is 'robot'" in recs[2].detail
    assert recs[4].detail == "messages[0].content is int, not a string"
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


def _arrow_stream(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def save_to_disk(root, tables: list[pa.Table]) -> None:
    """What ``datasets.Dataset.save_to_disk`` writes: arrow IPC stream shards named in state.json,
    the features in dataset_info.json and in the schema's ``huggingface`` metadata."""
    root.mkdir(parents=True)
    n = len(tables)
    names = [f"data-{i:05d}-of-{n:05d}.arrow" for i in range(n)]
    features = {c: {"dtype": "string", "_type": "Value"} for c in tables[0].column_names}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    for name, table in zip(names, tables, strict=True):
        (root / name).write_bytes(_arrow_stream(table.replace_schema_metadata(meta)))
    state = {"_data_files": [{"filename": x} for x in names], "_fingerprint": "0f1e2d3c4b5a6978",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}  # fmt: skip
    (root / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    info = {"builder_name": None, "citation": "", "description": "", "features": features}
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))


def test_hf_save_to_disk_dirs_and_their_splits(tmp_path):
    rows = [pa.table({"text": ["one", "two"]}), pa.table({"text": ["three"]})]
    save_to_disk(tmp_path / "single", rows)
    files = expand_inputs([str(tmp_path / "single")])
    assert [p.rsplit("/", 1)[1] for p in files.paths] == [
        "data-00000-of-00002.arrow",
        "data-00001-of-00002.arrow",
    ]
    texts = [r.payload for p in files.paths for r in parse_file(p, Path(p).read_bytes(), "auto")]
    assert texts == ["one", "two", "three"]
    # A DatasetDict: dataset_dict.json and one saved dataset per split.
    save_to_disk(tmp_path / "dd" / "train", rows[:1])
    save_to_disk(tmp_path / "dd" / "test", rows[1:])
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for split, shards in (("train", 1), ("test", 1)):
        paths = expand_inputs([str(tmp_path / "dd")], hf_split=split).paths
        assert len(paths) == shards and f"/dd/{split}/data-00000-of-00001.arrow" in paths[0]
    with pytest.raises(DataError, match=r"holds the splits \['train', 'test'\]; set data.hf_split"):
        expand_inputs([str(tmp_path / "dd")], hf_split="validation")
    # Inside a larger directory, a saved dataset counts by its shards, not its json files; a
    # state.json alone does not make one.
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "state.json").write_text('{"text": "a record"}\n')
    found = [p.split(str(tmp_path))[1] for p in expand_inputs([str(tmp_path)]).paths]
    assert found == ["/dd/train/data-00000-of-00001.arrow", "/own/state.json",
                     "/single/data-00000-of-00002.arrow", "/single/data-00001-of-00002.arrow"]  # fmt: skip


def test_hf_hub_snapshot_reads_one_split_through_blob_symlinks(tmp_path):
    repo = tmp_path / "hub" / "datasets--org--chat"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    (snap / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    blobs = {
        "data/train-00000-of-00001.parquet": pa.table({"prompt": ["hi"], "completion": ["yo"]}),
        "data/test-00000-of-00001.parquet": pa.table({"prompt": ["q"], "completion": ["a"]}),
    }
    for i, (rel, table) in enumerate(blobs.items()):
        pq.write_table(table, repo / "blobs" / f"sha{i}")
        (snap / rel).symlink_to(repo / "blobs" / f"sha{i}")
    (repo / "blobs" / "card").write_text("# My dataset\n")
    (snap / "README.md").symlink_to(repo / "blobs" / "card")
    for spec in (snap, repo):  # the snapshot, or the repo dir through refs/main
        files = expand_inputs([str(spec)])
        assert [p.rsplit("/", 1)[1] for p in files.paths] == ["train-00000-of-00001.parquet"]
    test = expand_inputs([str(snap)], hf_split="test").paths[0]
    recs = list(parse_file(test, Path(test).read_bytes(), "auto", SFT))
    assert recs[0].payload == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_chat_and_preference_rows_of_parquet_and_arrow(tmp_path):
    buf = io.BytesIO()
    table = pa.table({
        "question": ["What is 2+2?", None, "Say hi."],
        "answer": ["4", "5", None],
        "image": [b"\0" * 8] * 3,
    })  # fmt: skip
    pq.write_table(table, buf)
    fields = RecordFields(mode="sft", instruction="question", output="answer")
    recs = list(parse_file("qa.parquet", buf.getvalue(), "auto", fields))
    assert [(r.source, r.reason) for r in recs] == [
        ("qa.parquet:1", ""),
        ("qa.parquet:2", "missing_field"),
        ("qa.parquet:3", "missing_field"),
    ]
    assert recs[0].payload[0] == {"role": "user", "content": "What is 2+2?"}
    assert recs[1].detail.startswith("no 'question' field for format alpaca")
    unrelated = _arrow_stream(pa.table({"body": ["x"], "lang": ["en"]}))
    (rec,) = parse_file("u.arrow", unrelated, "auto", SFT)
    assert rec.reason == "unknown_format" and "(record fields: body, lang;" in rec.detail
    pairs = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "q", "chosen": "", "rejected": "b"},
    ]  # fmt: skip
    data = "\n".join(json.dumps(p) for p in pairs).encode()
    recs = list(parse_file("p.jsonl", data, "auto", RecordFields(mode="preference")))
    assert [(r.source, r.reason) for r in recs] == [
        ("p.jsonl:1", ""),
        ("p.jsonl:2", "identical_answers"),
        ("p.jsonl:3", "history_mismatch"),
        ("p.jsonl:4", "empty_answer"),
    ]
    assert recs[0].payload == {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": "a",
        "rejected": "b",
    }
    with pytest.raises(DataError, match="plain text cannot hold chat or preference records"):
        list(parse_file("a.txt", b"text", "auto", SFT))
