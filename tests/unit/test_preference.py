"""Preference records -> (prompt messages, chosen text, rejected text), and what is rejected."""

from __future__ import annotations

import pytest

from data_pipelines.formats import RecordFields, RecordProblem
from data_pipelines.preference import PreferencePair, split_preference

USER = {"role": "user", "content": "What is 2+2?"}


def say(text: str) -> dict:
    return {"role": "assistant", "content": text}


def problem(obj, fields: RecordFields | None = None) -> tuple[str, str]:
    with pytest.raises(RecordProblem) as err:
        split_preference(obj, fields)
    return err.value.reason, err.value.detail


def test_explicit_prompt_with_string_or_message_answers():
    expected = PreferencePair([USER], "4", "5")
    assert split_preference({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}) == expected
    assert split_preference({"prompt": [USER], "chosen": [say("4")], "rejected": say("5")}) == (
        expected
    )


def test_whole_conversations_split_at_the_last_assistant_turn():
    history = [USER, say("4"), {"role": "user", "content": "And 3+3?"}]
    record = {"chosen": [*history, say("6")], "rejected": [*history, say("7")]}
    assert split_preference(record) == PreferencePair(history, "6", "7")
    # UltraFeedback-style: a prompt column that repeats the shared history is checked, not used.
    ultra = {"prompt": "What is 2+2?", "chosen": [USER, say("4")], "rejected": [USER, say("5")]}
    assert split_preference(ultra) == PreferencePair([USER], "4", "5")
    other = {**ultra, "prompt": "What is 3+3?"}
    assert problem(other) == ("history_mismatch",
                              "'prompt' is not the history that 'chosen' and 'rejected' share")  # fmt: skip


def test_anthropic_hh_strings():
    head = "\n\nHuman: What is 2+2?\n\nAssistant: 4\n\nHuman: And 3+3?\n\nAssistant:"
    pair = split_preference({"chosen": head + " 6", "rejected": head + " 7"})
    assert pair.prompt == [USER, say("4"), {"role": "user", "content": "And 3+3?"}]
    assert (pair.chosen, pair.rejected) == ("6", "7")


def test_histories_must_be_identical():
    record = {"chosen": [USER, say("4")],
              "rejected": [{"role": "user", "content": "What is 3+3?"}, say("5")]}  # fmt: skip
    assert problem(record) == ("history_mismatch",
                               "'chosen' and 'rejected' differ at turn 0, before their last "
                               "assistant turn")  # fmt: skip
    hh = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: b"}
    assert problem(hh)[0] == "history_mismatch"


def test_rejections_name_the_field():
    assert problem({"prompt": "q", "chosen": "same  answer", "rejected": "same answer"}) == (
        "identical_answers",
        "'chosen' and 'rejected' are the same text",
    )
    assert problem({"prompt": "q", "chosen": " ", "rejected": "b"}) == (
        "empty_answer",
        "the 'chosen' answer is empty",
    )
    assert problem({"prompt": "q", "chosen": "a"}) == (
        "missing_field",
        "no 'rejected' field (record fields: chosen, prompt)",
    )
    assert problem({"chosen": "a", "rejected": "b"})[0] == "missing_field"
    mixed = {"chosen": [USER, say("4")], "rejected": "5"}
    assert problem(mixed) == ("malformed_preference", "'rejected' is a single answer while the "
                              "other side is a whole conversation; give both as conversations, "
                              "or both as answers")  # fmt: skip
    unanswered = {"chosen": [USER, say("4"), USER], "rejected": [USER, say("5"), USER]}
    assert problem(unanswered) == ("malformed_preference",
                                   "'chosen' ends on a user turn, not the answer")  # fmt: skip
    assert problem({"prompt": [USER, say("4")], "chosen": "a", "rejected": "b"}) == (
        "malformed_preference",
        "'prompt' ends on an assistant turn; the answers would follow it",
    )
    assert problem(
        {"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}
    ) == ("malformed_preference", "'chosen' is a user message, not the assistant's")
    bot = {"prompt": "q", "chosen": {"from": "bot", "value": "a"}, "rejected": "b"}
    assert problem(bot)[0] == "unknown_role"


def test_column_mapping():
    fields = RecordFields(mode="preference", prompt="question", chosen="good", rejected="bad")
    pair = split_preference({"question": "What is 2+2?", "good": "4", "bad": "5"}, fields)
    assert pair == PreferencePair([USER], "4", "5")
