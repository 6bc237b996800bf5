from cluster.docs import END, README, START, config_reference


def test_readme_config_reference_matches_the_schema():
    text = README.read_text()
    section = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == config_reference().strip(), "run: python -m cluster.docs --write"


def test_reference_lists_nested_keys():
    ref = config_reference()
    for key in ("`data.dedup.partitions`", "`data.sft.overlong`", "`tokenizer.vocab_size`"):
        assert key in ref


def _named_tests(text: str) -> list[tuple[str, str]]:
    """(file, test name or '') for every `tests/...py[::name]` and following `::name` in text."""
    import re

    found, current = [], ""
    for m in re.finditer(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`", text):
        path, name = m.group(1), m.group(2)
        if path:
            current = path
        if current and (path or name):
            found.append((current, name or ""))
    return found


def test_readme_comparison_rows_name_tests_that_exist():
    from pathlib import Path

    text = README.read_text()
    section = text.split("## What raylm does that the usual stack does not", 1)[1].split("\n## ")[0]
    named = _named_tests(section)
    assert len(named) >= 10
    root = README.parent
    for path, name in named:
        source = (root / path).read_text()
        assert not name or f"def {name}(" in source, f"{path}::{name} is not a test"
    assert _named_tests("`tests/a.py::x`, `::y`") == [("tests/a.py", "x"), ("tests/a.py", "y")]
    assert Path(root / "tests").is_dir()
