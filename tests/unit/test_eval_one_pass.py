"""``training.evaluate.one_pass``: eval.distributed's generation as one call for the whole eval."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import EvalConfig
from training.evaluate import (
    EvalError,
    EvalPlan,
    PairRecord,
    PromptError,
    TaskRecord,
    one_pass,
    run_preference_generation,
    run_tasks,
)


def _plan() -> EvalPlan:
    def task(name: str, n: int) -> list[TaskRecord]:
        return [TaskRecord(f"{name}.jsonl:{i + 1}", name,
                           [{"role": "user", "content": f"{name} {i}"}], f"{name} {i}")
                for i in range(n)]  # fmt: skip

    pairs = [PairRecord(f"pref.jsonl:{i + 1}", [{"role": "user", "content": f"pref {i}"}],
                        f"yes {i}", f"no {i}") for i in range(2)]  # fmt: skip
    return EvalPlan(cfg=EvalConfig(max_new_tokens=7), name="t", model_dir=Path("m"),
                    output=Path("o"), device="cpu", dtype="float32", vocab_size=10,
                    tasks={"sentiment": task("sentiment", 3), "qa": task("qa", 2)},
                    preference={"pref.jsonl": pairs})  # fmt: skip


class Echo:
    """A Generate that answers each prompt with its own text and records its calls."""

    def __init__(self, refuse: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.refuse = refuse

    def __call__(self, conversations, max_new_tokens):
        self.calls.append((len(conversations), max_new_tokens))
        if self.refuse is not None:
            raise PromptError(self.refuse, "longer than the context")
        return [c[-1]["content"] for c in conversations]


def _scores() -> list[dict]:
    return [{"metrics": {}, "samples": [], "seconds": 0.0}]


def test_one_call_answers_every_task_and_preference_prompt_as_per_call_generation_does() -> None:
    plan, direct, single = _plan(), Echo(), Echo()
    want_tasks, want_pref = run_tasks(plan, direct), _scores()
    run_preference_generation(plan, direct, want_pref)
    assert direct.calls == [(3, 7), (2, 7), (2, 7)]  # one per task and preference file

    replay = one_pass(single, plan)
    assert single.calls == [(7, 7)]  # every prompt, at once
    got_tasks, got_pref = run_tasks(plan, replay), _scores()
    run_preference_generation(plan, replay, got_pref)
    assert single.calls == [(7, 7)]
    for a, b in zip(got_tasks, want_tasks, strict=True):
        assert (a["task"], a["metrics"], a["samples"]) == (b["task"], b["metrics"], b["samples"])
    assert got_pref[0]["metrics"] == want_pref[0]["metrics"]


def test_a_refused_prompt_names_its_file_and_line_and_other_prompts_are_refused() -> None:
    with pytest.raises(EvalError, match=r"^qa\.jsonl:2: longer than the context$"):
        one_pass(Echo(refuse=4), _plan())  # sentiment 0-2, qa 0-1: index 4 is qa line 2
    replay = one_pass(Echo(), _plan())
    with pytest.raises(RuntimeError, match="other than the planned ones"):
        replay([[{"role": "user", "content": "qa 0"}]], 7)  # sentiment comes first
