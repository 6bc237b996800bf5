"""The synthetic corpus: deterministic bytes, the documented layout, and tasks a model can learn."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from cluster.cli import main
from data_pipelines.preference import split_preference
from data_pipelines.synth import (
    HELDOUT_PER_TASK,
    PREFERENCE_HELDOUT,
    PREFERENCE_STYLES,
    TASKS,
    preference_train_count,
    sft_train_count,
    write_corpus,
)

DOCS, SHARDS = 400, 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_corpus(out, docs=DOCS, seed=7, shards=SHARDS)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _train(root: Path) -> list[dict]:
    return [r for p in sorted((root / "sft" / "train").glob("*.jsonl")) for r in _read_jsonl(p)]


def _heldout(root: Path, task: str) -> list[dict]:
    return _read_jsonl(root / "sft" / "heldout" / f"{task}.jsonl")


def _prompt(record: dict) -> str:
    return record["messages"][0]["content"]


def _answer(record: dict) -> str:
    return record["reference"] if "reference" in record else record["messages"][1]["content"]


# --- determinism ------------------------------------------------------------------------------


def test_same_arguments_give_identical_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    write_corpus(tmp_path / "a", docs=300, seed=3, shards=3, workers=1)
    write_corpus(tmp_path / "b", docs=300, seed=3, shards=3, workers=2)  # process pool path
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a == b
    assert not any(name.endswith(".tmp") for name in a)


def test_different_seed_gives_different_files(tmp_path: Path) -> None:
    write_corpus(tmp_path / "a", docs=200, seed=0, shards=2)
    write_corpus(tmp_path / "b", docs=200, seed=1, shards=2)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        if name != "synth.json":
            assert a[name] != b[name], name


# --- layout and counts ------------------------------------------------------------------------


def test_layout_shard_counts_and_summary_file(corpus: Path) -> None:
    pretrain = sorted((corpus / "pretrain").glob("*.jsonl"))
    assert [p.name for p in pretrain] == [f"shard-{i:05d}.jsonl" for i in range(SHARDS)]
    assert [len(_read_jsonl(p)) for p in pretrain] == [134, 133, 133]  # contiguous, sums to DOCS
    train_shards = sorted((corpus / "sft" / "train").glob("*.jsonl"))
    assert len(train_shards) == SHARDS
    assert Counter(r["task"] for r in _train(corpus)) == {t: sft_train_count(DOCS) for t in TASKS}
    assert sft_train_count(DOCS) == 100 and sft_train_count(4000) == 1000

    summary = json.loads((corpus / "synth.json").read_text())
    assert summary["args"] == {"docs": DOCS, "seed": 7, "shards": SHARDS}
    for section in ("pretrain", "sft_train", "sft_heldout"):
        for rel, count in summary[section]["files"].items():
            assert len(_read_jsonl(corpus / rel)) == count, rel
    assert sum(summary["pretrain"]["kinds"].values()) == DOCS


def test_smallest_corpus_still_has_every_task(tmp_path: Path) -> None:
    write_corpus(tmp_path, docs=1, shards=1)
    assert len(_read_jsonl(tmp_path / "pretrain" / "shard-00000.jsonl")) == 1
    assert Counter(r["task"] for r in _train(tmp_path)) == {t: 100 for t in TASKS}


def test_rerun_with_fewer_shards_leaves_no_stale_shards(tmp_path: Path) -> None:
    write_corpus(tmp_path, docs=200, shards=4)
    write_corpus(tmp_path, docs=200, shards=2)
    for sub in ("pretrain", "sft/train"):
        assert len(list((tmp_path / sub).glob("*.jsonl"))) == 2, sub
    assert sum(len(_read_jsonl(p)) for p in (tmp_path / "pretrain").glob("*.jsonl")) == 200


# --- record formats ---------------------------------------------------------------------------


def test_every_line_is_json_with_the_documented_fields(corpus: Path) -> None:
    for path in (corpus / "pretrain").glob("*.jsonl"):
        for rec in _read_jsonl(path):
            assert set(rec) == {"text"} and isinstance(rec["text"], str) and rec["text"].strip()
    for rec in _train(corpus):
        assert set(rec) == {"task", "messages"} and rec["task"] in TASKS
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in rec["messages"])
    for task in TASKS:
        records = _heldout(corpus, task)
        for rec in records:
            assert set(rec) == {"task", "messages", "reference"} and rec["task"] == task
            assert [m["role"] for m in rec["messages"]] == ["user"] and rec["reference"]


def test_pretraining_mixes_stories_reviews_facts_and_zorbish(corpus: Path) -> None:
    texts = [r["text"] for p in (corpus / "pretrain").glob("*.jsonl") for r in _read_jsonl(p)]
    markers = ("Overall, a positive review.", "Overall, a negative review.", "In Zorbish, '")
    for marker in (*markers, "Facts: ", "\nQuestion: ", " lives in ", " lived in "):
        assert any(marker in t for t in texts), marker
    assert 400 <= sum(map(len, texts)) / len(texts) <= 800  # average characters per document


# --- tasks ------------------------------------------------------------------------------------


def test_sentiment_labels_are_exactly_balanced(corpus: Path) -> None:
    train = [r for r in _train(corpus) if r["task"] == "sentiment"]
    assert Counter(_answer(r) for r in train) == {"positive": 50, "negative": 50}
    heldout = _heldout(corpus, "sentiment")
    half = HELDOUT_PER_TASK // 2
    assert Counter(_answer(r) for r in heldout) == {"positive": half, "negative": half}
    for rec in train + heldout:
        prompt = _prompt(rec)
        assert prompt.startswith("Review: ")
        assert prompt.endswith("\nIs this review positive or negative?")
        assert prompt.count(". ") >= 3  # opening, polar phrases and filler: not a one-word review


def test_heldout_has_200_per_task_and_never_repeats_a_training_prompt(corpus: Path) -> None:
    train_prompts = {_prompt(r) for r in _train(corpus)}
    assert len(train_prompts) == 3 * sft_train_count(DOCS)  # unique, so dedup keeps them all
    for task in TASKS:
        prompts = [_prompt(r) for r in _heldout(corpus, task)]
        assert len(prompts) == HELDOUT_PER_TASK >= 200
        assert len(set(prompts)) == len(prompts)
        assert not set(prompts) & train_prompts, task


def _pairs(corpus: Path, split: str) -> list[dict]:
    files = sorted((corpus / "preference" / split).glob("*.jsonl"))
    return [r for p in files for r in _read_jsonl(p)]


def _base(prompt: str) -> str:
    """A preference prompt without its style request: an SFT-style prompt."""
    for ask in PREFERENCE_STYLES.values():
        if ask and prompt.endswith("\n" + ask):
            return prompt.removesuffix("\n" + ask)
    return prompt


def test_preference_pairs_are_disjoint_from_each_other_and_from_sft(corpus: Path) -> None:
    train, heldout = _pairs(corpus, "train"), _pairs(corpus, "heldout")
    assert len(train) == preference_train_count(DOCS) and len(heldout) == PREFERENCE_HELDOUT
    train_bases = {_base(r["prompt"]) for r in train}
    held_bases = {_base(r["prompt"]) for r in heldout}
    assert len(train_bases) == len(train) and len(held_bases) == len(heldout)  # no repeats
    assert not train_bases & held_bases
    sft = {_prompt(r) for r in _train(corpus)} | {
        _prompt(r) for task in TASKS for r in _heldout(corpus, task)}  # fmt: skip
    assert not (train_bases | held_bases) & sft  # never a review, fact set or sentence of SFT


def test_preference_pairs_prefer_the_requested_style(corpus: Path) -> None:
    pairs = _pairs(corpus, "train") + _pairs(corpus, "heldout")
    styles = Counter((r["task"], r["style"]) for r in _pairs(corpus, "heldout"))
    n = PREFERENCE_HELDOUT // 3
    assert styles == {(t, s): n // (2 if s == "sentence" else 4) for t in TASKS
                      for s in PREFERENCE_STYLES}  # fmt: skip
    for r in pairs:
        pair = split_preference(r)  # what `data prepare` reads, so it never rejects one
        bare = pair.rejected if r["style"] == "sentence" else pair.chosen
        sentence = pair.chosen if r["style"] == "sentence" else pair.rejected
        assert sentence == f"This is {bare}."
        assert r["prompt"].endswith(PREFERENCE_STYLES[r["style"]])
    labels = Counter(
        r["chosen"] for r in pairs if r["task"] == "sentiment" and r["style"] == "plain"
    )
    assert labels["positive"] == labels["negative"] > 0


def _zorbish_pairs(corpus: Path) -> list[tuple[str, str]]:
    pairs = []
    for task_records in (_train(corpus), _heldout(corpus, "rewrite")):
        for rec in task_records:
            if rec["task"] == "rewrite":
                pairs.append((_prompt(rec).removeprefix("Rewrite in Zorbish: "), _answer(rec)))
    for path in (corpus / "pretrain").glob("*.jsonl"):
        for rec in _read_jsonl(path):
            pairs += re.findall(r"In Zorbish, '([a-z ]+)' is '([a-z ]+)'\.", rec["text"])
    return pairs


def test_rewrite_is_one_consistent_word_mapping(corpus: Path) -> None:
    en_to_zo: dict[str, str] = {}
    zo_to_en: dict[str, str] = {}
    for english, zorbish in _zorbish_pairs(corpus):
        en_words, zo_words = english.split(), zorbish.split()
        assert 3 <= len(en_words) <= 8 and len(zo_words) == len(en_words), english
        for en, zo in zip(en_words, zo_words, strict=True):
            assert en_to_zo.setdefault(en, zo) == zo, f"{en!r} maps to two words"
            assert zo_to_en.setdefault(zo, en) == en, f"{zo!r} translates two words"
    assert 60 <= len(en_to_zo) <= 100
    assert all(en != zo for en, zo in en_to_zo.items())  # it is a rewrite, not a copy


def test_qa_answers_are_stated_in_the_facts(corpus: Path) -> None:
    records = [r for r in _train(corpus) if r["task"] == "qa"] + _heldout(corpus, "qa")
    for rec in records:
        facts_part, question = _prompt(rec).split("\nQuestion: ")
        assert facts_part.startswith("Facts: ")
        facts = facts_part.removeprefix("Facts: ").split(". ")
        assert 3 <= len(facts) <= 5
        answer = _answer(rec)
        assert 1 <= len(answer.split()) <= 2
        names = {f.split()[0].removesuffix("'s") for f in facts}
        assert 1 <= len(names) <= 3
        asked = [n for n in names if n in question]
        assert len(asked) == 1, question
        # The answer is stated in a fact about the person asked about, not just anywhere.
        assert any(f.startswith(asked[0]) and answer in f for f in facts), (facts, question)


# --- bad arguments and the command line -------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"docs": 0}, "--docs must be >= 1, got 0"),
        ({"shards": 0}, "--shards must be >= 1, got 0"),
        ({"docs": 3, "shards": 4}, r"--shards must be <= --docs \(3\), got 4"),
        ({"docs": "10"}, "--docs must be an integer"),
        ({"seed": 1.5}, "--seed must be an integer"),
    ],
)
def test_bad_arguments_raise_naming_the_parameter(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        write_corpus(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()  # validated before anything is written


def test_cli_synth_writes_the_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path), "--docs", "200", "--shards", "2"]) == 0
    assert len(list((tmp_path / "pretrain").glob("shard-*.jsonl"))) == 2
    assert len(list((tmp_path / "sft" / "train").glob("shard-*.jsonl"))) == 2
    for task in TASKS:
        assert (tmp_path / "sft" / "heldout" / f"{task}.jsonl").is_file()
    printed = capsys.readouterr().out
    assert str(tmp_path) in printed and "200 docs" in printed and "100 sentiment" in printed
