"""`raylm eval` with lm-eval tasks where lm-evaluation-harness (the optional `eval` extra) is not
installed: one line naming the setting and the install command, before any other check or work."""

from __future__ import annotations

import sys

from cluster.cli import main


def test_harness_tasks_without_lm_eval_fail_first_naming_the_key_and_the_extra(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if absent
    missing = tmp_path / "no-such-model"  # would be the first error if anything else ran first
    args = ["eval", "--set", f"eval.model={missing}", "--set", "eval.harness_tasks=[hellaswag]"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "eval.harness_tasks: needs lm-evaluation-harness, which is not installed; "
        "pip install raylm[eval]"
    )
    assert str(missing) not in "\n".join(err)
