import re
from pathlib import Path

import pytest

from cluster.docs import DOC, END, START, config_reference, update_doc

REPO = Path(__file__).resolve().parents[2]
GUARANTEES = REPO / "docs" / "guarantees.md"
# The READMEs and docs/*.md: what a reader takes config keys from.
PROSE = [REPO / "README.md", REPO / "cluster" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_config_doc_reference_matches_the_schema():
    assert DOC == REPO / "docs" / "config.md"
    text = DOC.read_text()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == config_reference().strip(), "run: python -m cluster.docs --write"


def test_update_doc_rewrites_only_the_generated_section(tmp_path):
    doc = tmp_path / "config.md"
    doc.write_text(f"# head\n{START}\n| stale | row |\n{END}\ntail\n")
    assert update_doc(doc) is True
    text = doc.read_text()
    assert text == f"# head\n{START}\n{config_reference()}\n{END}\ntail\n"
    assert update_doc(doc) is False
    doc.write_text("# no markers\n")
    with pytest.raises(ValueError, match="config-reference:start"):
        update_doc(doc)


def test_reference_lists_nested_keys():
    ref = config_reference()
    for key in ("`data.dedup.partitions`", "`data.sft.overlong`", "`tokenizer.vocab_size`"):
        assert key in ref


_SECTIONS = "ray|data|tokenizer|model|train|deepspeed|scaling|eval|serve|generate"
# `section.key` in backticks, ended by a backtick, space, `:`, `=` or `[` (not `serve.run(`);
# file names such as `model.safetensors` or `eval.json` are not keys.
_KEY = re.compile(rf"`((?:{_SECTIONS})(?:\.\w+)+)(?=[`\s:=\[])")
_FILE = re.compile(r"\.(json|jsonl|png|safetensors|yaml|md|py)$")


def config_key_problems(text: str, keys: set[str]) -> list[str]:
    """Dotted config keys named in text that are neither a key nor a section of the schema."""
    known = keys | {k.rsplit(".", n)[0] for k in keys for n in range(1, k.count(".") + 1)}
    named = {m.group(1) for m in _KEY.finditer(text) if not _FILE.search(m.group(1))}
    return sorted(named - known)


@pytest.mark.parametrize("path", PROSE, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_name_only_config_keys_that_exist(path):
    keys = set(re.findall(r"^\| `([\w.]+)` \|", config_reference(), re.MULTILINE))
    assert config_key_problems(path.read_text(), keys) == []
    assert config_key_problems("`train.lr` `train.lora` `train.lr_max: 1` `eval.json`", keys) == [
        "train.lr_max"
    ]


def _named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test name or '') for every `tests/...py[::name]` and following `::name` in text."""
    found, current = [], ""
    for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", text):
        path, name = m.group(1), m.group(2)
        if path:
            current = path
        if current and (path or name):
            found.append((current, name or ""))
    return found


def test_readme_comparison_rows_name_tests_that_exist():
    """docs/guarantees.md: every row names the test that shows it, and that test exists."""
    text = GUARANTEES.read_text()
    assert text.startswith("# What raylm does that the usual stack does not\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 10 and all(_named_tests(row) for row in rows)
    named = _named_tests(text)
    for path, name in named:
        source = (REPO / path).read_text()
        assert not name or f"def {name}(" in source, f"{path}::{name} is not a test"
    assert _named_tests("`tests/a.py::x`, `::y`") == [("tests/a.py", "x"), ("tests/a.py", "y")]
    assert "(docs/guarantees.md)" in (REPO / "README.md").read_text()
