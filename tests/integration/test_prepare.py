"""`data prepare` on a real local Ray instance: contracts, rejections, determinism, re-runs."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.clean import content_hash, is_validation, normalize_text
from data_pipelines.errors import DataError
from data_pipelines.manifest import existing_complete_manifest
from data_pipelines.pack import IGNORE_INDEX
from data_pipelines.tokenize import load_tokenizer
from tests.conftest import assistant_spans, prepare_data

REQUIRED = (
    "documents_read",
    "documents_kept",
    "rejected",
    "tokens",
    "seq_len",
    "splits",
    "tokenizer",
    "config_hash",
)


def read_split(out: Path, manifest: dict, split: str) -> pa.Table:
    files = manifest["splits"][split]["files"]
    return pa.concat_tables([pq.read_table(out / split / f) for f in files])


def corpus_texts(directory: Path) -> list[str]:
    texts = []
    for f in sorted(directory.glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in f.read_text().splitlines() if line]
    return texts


def test_pretrain_output_contract(prepared_pretrain, synth_corpus, tokenizer_dir):
    out, m = prepared_pretrain.output, prepared_pretrain.manifest
    assert all(k in m for k in REQUIRED)
    tok = load_tokenizer(tokenizer_dir)
    expected = {}
    for text in corpus_texts(synth_corpus / "pretrain"):
        norm = normalize_text(text)
        expected[norm] = "validation" if is_validation(content_hash(norm), 0.1) else "train"
    total_real = 0
    for split in ("train", "validation"):
        table = read_split(out, m, split)
        assert table.column("row_id").to_pylist() == list(range(table.num_rows))
        assert table.schema.field("input_ids").type == pa.list_(pa.int32())
        ids = np.array(table.column("input_ids").to_pylist())
        pos = np.array(table.column("position_ids").to_pylist())
        assert ids.shape == (m["splits"][split]["rows"], m["seq_len"])
        # positions count up by one inside a document and restart right after each EOS
        after_eos = np.zeros_like(ids, dtype=bool)
        after_eos[:, 1:] = ids[:, :-1] == tok.eos_token_id
        assert (pos[after_eos] == 0).all()
        cont = ~after_eos[:, 1:] & (pos[:, 1:] != 0)
        assert (pos[:, 1:][cont] == pos[:, :-1][cont] + 1).all()
        real = ids[ids != tok.pad_token_id]
        assert len(real) == m["splits"][split]["tokens"]
        total_real += len(real)
        # every kept document comes back exactly once, in its split, byte for byte
        docs = np.split(real, np.flatnonzero(real == tok.eos_token_id) + 1)[:-1]
        decoded = [tok.decode(d[:-1]) for d in docs]
        assert len(decoded) == len(set(decoded))
        assert set(decoded) == {t for t, s in expected.items() if s == split}
    assert total_real == m["tokens"]
    assert m["documents_kept"] == len(expected)
    assert m["documents_read"] == m["documents_kept"] + sum(m["rejected"].values())


def test_sft_labels_cover_assistant_answers_only(prepared_sft, synth_corpus, tokenizer_dir):
    out, m = prepared_sft.output, prepared_sft.manifest
    tok = load_tokenizer(tokenizer_dir)
    end_id = tok.convert_tokens_to_ids("<|end|>")
    answers = set()
    for f in (synth_corpus / "sft" / "train").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            msgs = json.loads(line)["messages"]
            answers |= {normalize_text(x["content"]) for x in msgs if x["role"] == "assistant"}
    table = read_split(out, m, "train")
    ids = np.array(table.column("input_ids").to_pylist())
    labels = np.array(table.column("labels").to_pylist())
    pos = np.array(table.column("position_ids").to_pylist())
    carries = labels != IGNORE_INDEX
    assert (labels[carries] == ids[carries]).all()
    assert ((pos == 0).sum(axis=1) > 2).any(), "pack=True should put several conversations in a row"
    assert assistant_spans(ids, carries, tok, end_id, answers) > 0


def _write_messy(d: Path) -> None:
    d.mkdir()
    good = [f"Document number {i} talks about the quiet town of Brookfield." for i in range(6)]
    lines = [
        json.dumps({"text": good[0], "id": 1}),
        "{not json",
        json.dumps({"body": "no text field here"}),
        json.dumps({"text": good[1], "lang": "en", "meta": {"x": [1, 2]}}),
        json.dumps({"text": "tiny"}),
        json.dumps({"text": "long " * 100}),
        json.dumps(
            {"text": "Write to ana@example.com or call +1 415 555 0132 for Brookfield news."}
        ),
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"text": "bad \xff byte"}\n'
    (d / "a.jsonl").write_bytes(raw)
    gz = "\n".join(json.dumps({"text": t}) for t in (good[2], good[0]))
    (d / "b.jsonl.gz").write_bytes(gzip.compress(gz.encode()))
    pq.write_table(pa.table({"text": [good[3], None, good[4]], "n": [1, 2, 3]}), d / "c.parquet")
    (d / "d.txt").write_text(good[5] + "\n")
    (d / "e.jsonl").write_text("")


def test_every_rejection_reason_is_counted_with_its_location(ray_local, tokenizer_dir, tmp_path):
    _write_messy(tmp_path / "in")
    result = prepare_data(
        tokenizer_dir,
        inputs=[str(tmp_path / "in")],
        output=str(tmp_path / "out"),
        seq_len=32,
        min_chars=10,
        max_chars=300,
        validation_fraction=0.0,
        pii={"enabled": True},
    )
    m = result.manifest
    assert m["rejected"] == {
        "duplicate": 1,
        "empty_file": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_text": 2,
        "too_long": 1,
        "too_short": 1,
    }
    assert m["documents_kept"] == 7 and m["documents_read"] == 15
    assert m["pii_redacted"] == {"card": 0, "email": 1, "ip": 0, "phone": 1}
    samples = m["rejected_samples"]
    assert samples["malformed_json"] == [f"{tmp_path}/in/a.jsonl:2"]
    assert samples["invalid_utf8"] == [f"{tmp_path}/in/a.jsonl:8"]
    assert sorted(samples["missing_text"]) == [
        f"{tmp_path}/in/a.jsonl:3",
        f"{tmp_path}/in/c.parquet:2",
    ]
    assert samples["duplicate"][0].endswith(("b.jsonl.gz:2", "a.jsonl:1"))
    tok = load_tokenizer(tokenizer_dir)
    ids = read_split(result.output, m, "train").column("input_ids").to_pylist()
    text = tok.decode([t for row in ids for t in row if t != tok.pad_token_id])
    assert "<EMAIL>" in text and "ana@example.com" not in text and "<PHONE>" in text
    assert m["splits"]["validation"] == {"rows": 0, "tokens": 0, "files": [], "layout": []}


def test_strict_mode_stops_at_the_bad_line(ray_local, tokenizer_dir, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text('{"text": "a fine document"}\n{oops\n')
    with pytest.raises(DataError, match=r"in/x.jsonl:2: malformed_json \(data.strict is on\)"):
        prepare_data(
            tokenizer_dir, inputs=[str(tmp_path / "in")], output=str(tmp_path / "o"), strict=True
        )
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_input_and_empty_result_are_clear_errors(ray_local, tokenizer_dir, tmp_path):
    with pytest.raises(DataError, match=r"data.inputs\[0\]: .*nowhere: no such file"):
        prepare_data(tokenizer_dir, inputs=[str(tmp_path / "nowhere")], output=str(tmp_path / "o"))
    (tmp_path / "bad.jsonl").write_text("{x\n{y\n")
    with pytest.raises(DataError, match="no documents left from 2 records read.*malformed_json=2"):
        prepare_data(
            tokenizer_dir, inputs=[str(tmp_path / "bad.jsonl")], output=str(tmp_path / "o")
        )


def test_output_is_identical_across_actors_blocks_and_shard_order(
    prepared_pretrain, synth_corpus, tokenizer_dir, tmp_path
):
    shards = sorted(str(p) for p in (synth_corpus / "pretrain").glob("*.jsonl"))
    again = prepare_data(
        tokenizer_dir,
        inputs=shards[::-1],
        output=str(tmp_path / "again"),
        seq_len=128,
        validation_fraction=0.1,
        rows_per_file=64,
        num_actors=1,
        batch_size=7,
        block_size_mb=1,
        dedup={"partitions": 3},
    )
    assert not again.skipped
    assert again.manifest["checksums"] == prepared_pretrain.manifest["checksums"]
    assert len(again.manifest["checksums"]) > 2
    train = again.manifest["splits"]["train"]  # each parquet file's Arrow copy, checksummed too
    assert train["arrays"] == [n.replace(".parquet", ".arrow") for n in train["files"]]
    assert {f"train/{n}" for n in train["arrays"]} <= set(again.manifest["checksums"])
    assert again.manifest["fingerprint"] == prepared_pretrain.manifest["fingerprint"]


def test_cross_shard_duplicates_keep_the_first_copy_whatever_the_actors(tokenizer_dir, tmp_path):
    """Originals late in the first shard, their copies early in the later shards, small chunks:
    with dedup decided in the actors, whichever actor got there first kept its copy. Now the
    first copy in (shard, line) order is kept: identical bytes for 1 or 4 actors and reversed
    input order, and every duplicate named is a later shard's copy."""
    import json

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    doc = "Document number {} tells the story of a quiet town by the river, {} times over."
    originals = [doc.format(i, i % 7) for i in range(40)]
    lines = {
        "a.jsonl": [doc.format(1000 + i, i) for i in range(260)] + originals,
        "b.jsonl": originals[:20] + [doc.format(2000 + i, i) for i in range(260)],
        "c.jsonl": originals[20:] + [doc.format(3000 + i, i) for i in range(260)],
    }
    for name, texts in lines.items():
        (corpus / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = dict(seq_len=64, validation_fraction=0.1, rows_per_file=32, batch_size=8,
                  dedup={"partitions": 3})  # fmt: skip
    shards = [str(corpus / n) for n in sorted(lines)]
    runs = [
        prepare_data(tokenizer_dir, inputs=shards, output=str(tmp_path / "one"), num_actors=1,
                     **common),
        prepare_data(tokenizer_dir, inputs=shards[::-1], output=str(tmp_path / "four"),
                     num_actors=4, actor_cpus=0.5, **common),
    ]  # fmt: skip
    for run in runs:
        assert run.manifest["rejected"]["duplicate"] == 40
        for where in run.manifest["rejected_samples"]["duplicate"]:
            name, line = where.rsplit(":", 1)
            assert Path(name).name in ("b.jsonl", "c.jsonl") and int(line) <= 20, where
    assert runs[0].manifest["checksums"] == runs[1].manifest["checksums"]


def test_rerun_skips_only_a_complete_identical_output(
    prepared_pretrain, synth_corpus, tokenizer_dir, tmp_path
):
    kwargs = dict(
        inputs=[str(synth_corpus / "pretrain")],
        seq_len=128,
        validation_fraction=0.1,
        rows_per_file=64,
    )
    same = prepare_data(tokenizer_dir, output=str(prepared_pretrain.output), **kwargs)
    assert same.skipped and same.manifest == prepared_pretrain.manifest
    # a partial output (one shard gone) is rebuilt, to the same bytes
    copy = tmp_path / "partial"
    shutil.copytree(prepared_pretrain.output, copy)
    assert existing_complete_manifest(copy, same.manifest["fingerprint"])
    (copy / "train" / "part-00000.arrow").unlink()  # an Arrow copy missing: not complete either
    assert not existing_complete_manifest(copy, same.manifest["fingerprint"])
    (copy / "train" / "part-00001.parquet").unlink()
    rebuilt = prepare_data(tokenizer_dir, output=str(copy), **kwargs)
    assert not rebuilt.skipped
    assert rebuilt.manifest["checksums"] == prepared_pretrain.manifest["checksums"]
    # one changed input byte invalidates the output
    inputs = tmp_path / "inputs"
    shutil.copytree(synth_corpus / "pretrain", inputs)
    shard = sorted(inputs.glob("*.jsonl"))[0]
    data = bytearray(shard.read_bytes())
    data[data.index(b"a")] = ord("e")
    shard.write_bytes(bytes(data))
    kwargs["inputs"] = [str(inputs)]
    changed = prepare_data(tokenizer_dir, output=str(copy), **kwargs)
    assert not changed.skipped
    assert changed.manifest["fingerprint"] != prepared_pretrain.manifest["fingerprint"]


def _conversations(path: Path, n: int) -> None:
    rows = []
    for i in range(n):
        long_q = " ".join(f"word{j}" for j in range(5 + 7 * (i % 4)))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}: {long_q}?"},
                    {"role": "assistant", "content": f"Answer {i}."},
                ]
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_overlong_conversations_are_dropped_or_truncated_and_counted(
    ray_local, tokenizer_dir, tmp_path
):
    _conversations(tmp_path / "chat.jsonl", 24)
    common = dict(
        inputs=[str(tmp_path / "chat.jsonl")], mode="sft", seq_len=48, validation_fraction=0.0
    )
    dropped = prepare_data(tokenizer_dir, output=str(tmp_path / "drop"), **common).manifest
    cut = prepare_data(
        tokenizer_dir, output=str(tmp_path / "cut"), sft={"overlong": "truncate"}, **common
    ).manifest
    assert dropped["rejected"].get("too_long", 0) > 0
    assert cut["truncated"] == dropped["rejected"]["too_long"]
    assert (
        cut["documents_kept"]
        == 24
        == dropped["documents_kept"] + dropped["truncated"] + dropped["rejected"]["too_long"]
    )
    rows = read_split(tmp_path / "cut", cut, "train")
    assert {len(r) for r in rows.column("input_ids").to_pylist()} == {48}
    assert rows.num_rows == 24  # pack=False: one conversation per row


def test_any_local_hf_tokenizer_dir_works(ray_local, synth_corpus, tmp_path):
    """A tokenizer that raylm did not train: no pad token (EOS pads) and no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in corpus_texts(synth_corpus / "pretrain")[:50] for w in t.split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    foreign = tmp_path / "foreign-tok"
    PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", unk_token="[UNK]"
    ).save_pretrained(foreign)
    shard = sorted((synth_corpus / "pretrain").glob("*.jsonl"))[0]
    result = prepare_data(foreign, inputs=[str(shard)], output=str(tmp_path / "o"), seq_len=64)
    m = result.manifest
    assert m["pad_token_id"] == m["eos_token_id"] == 1
    assert m["tokenizer"]["path"] == str(foreign.resolve())  # pretrain: used as it is
    assert "augmented_from" not in m["tokenizer"] and not (tmp_path / "o" / "tokenizer").exists()
    assert m["splits"]["train"]["rows"] > 0
    # sft mode gives it the default chat template: tests/integration/test_foreign_tokenizer.py


def _chat_inputs(d: Path) -> list[str]:
    """Chat records in four formats, and one bad record of each kind; returns the answers."""
    d.mkdir()
    answers = [f"Answer number {i} is about Brookfield." for i in range(4)]
    good = [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Question zero?"},
                      {"role": "assistant", "content": answers[0]}]},
        {"conversations": [{"from": "human", "value": "Question one?"},
                           {"from": "gpt", "value": answers[1]}]},
        {"question": "Question two?", "input": "Some context.", "answer": answers[2]},
    ]  # fmt: skip
    bad = [
        {"dialog": "no known field"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        {"question": "no answer"},
    ]
    (d / "a.jsonl").write_text("\n".join(json.dumps(r) for r in good + bad) + "\n")
    pq.write_table(pa.table({"prompt": ["Question three?"], "completion": [answers[3]]}),
                   d / "b.parquet")  # fmt: skip
    return answers


def test_sft_formats_are_detected_per_record_and_labelled(ray_local, tokenizer_dir, tmp_path):
    answers = _chat_inputs(tmp_path / "in")
    result = prepare_data(
        tokenizer_dir, inputs=[str(tmp_path / "in")], output=str(tmp_path / "out"), mode="sft",
        seq_len=64, validation_fraction=0.0,
        sft={"columns": {"instruction": "question", "output": "answer"}},
    )  # fmt: skip
    m = result.manifest
    assert m["documents_kept"] == 4
    assert m["rejected"] == {"missing_field": 1, "unknown_format": 1, "unknown_role": 1}
    samples = {k: v[0] for k, v in m["rejected_samples"].items()}
    assert samples["unknown_format"].startswith(f"{tmp_path}/in/a.jsonl:4: no messages, ")
    assert samples["unknown_role"].startswith(f"{tmp_path}/in/a.jsonl:5: conversations[1].from "
                                              "is 'bot'")  # fmt: skip
    assert samples["missing_field"] == (f"{tmp_path}/in/a.jsonl:6: no 'answer' field for format "
                                        "alpaca (record fields: question)")  # fmt: skip
    tok = load_tokenizer(tokenizer_dir)
    table = read_split(result.output, m, "train")
    ids = np.array(table.column("input_ids").to_pylist())
    labels = np.array(table.column("labels").to_pylist())
    end_id = tok.convert_tokens_to_ids("<|end|>")
    assert assistant_spans(ids, labels != IGNORE_INDEX, tok, end_id, set(answers)) == 4
    text = tok.decode(ids.ravel())
    assert "<|system|>\nBe brief.<|end|>" in text
    assert "<|user|>\nQuestion two?\nSome context.<|end|>" in text


def test_preference_pairs_are_written_one_per_row(ray_local, tokenizer_dir, tmp_path):
    (tmp_path / "in").mkdir()
    pairs = [
        {"prompt": f"Where does Anna live, {i}?", "chosen": f"In Brookfield {i}.",
         "rejected": f"In the town {i}."} for i in range(3)
    ] + [{"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}]  # fmt: skip
    (tmp_path / "in" / "p.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    result = prepare_data(tokenizer_dir, inputs=[str(tmp_path / "in")], mode="preference",
                          output=str(tmp_path / "out"), seq_len=64, validation_fraction=0.0)  # fmt: skip
    m = result.manifest
    assert (m["mode"], m["documents_kept"], m["rejected"]) == (
        "preference",
        3,
        {"identical_answers": 1},
    )
    assert m["rejected_samples"]["identical_answers"] == [
        f"{tmp_path}/in/p.jsonl:4: 'chosen' and 'rejected' are the same text"
    ]
    rows = read_split(result.output, m, "train").to_pylist()
    assert [r["row_id"] for r in rows] == [0, 1, 2]
    tok = load_tokenizer(tokenizer_dir)
    for row, pair in zip(rows, pairs, strict=False):
        for side in ("chosen", "rejected"):
            ids, labels = np.array(row[f"{side}_input_ids"]), np.array(row[f"{side}_labels"])
            assert tok.decode(ids[labels != IGNORE_INDEX]) == f"{pair[side]}<|end|>"
            assert tok.decode(ids).startswith(f"<|user|>\n{pair['prompt']}<|end|><|assistant|>")
    assert m["tokens"] == sum(
        len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows
    )
