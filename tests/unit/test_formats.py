"""Chat records in the formats people have, normalised to OpenAI-style messages."""

from __future__ import annotations

import pytest

from data_pipelines.config import DataConfig
from data_pipelines.formats import RecordFields, RecordProblem, record_format, to_messages

SFT = RecordFields(mode="sft")
ANSWERED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def problem(obj, fields: RecordFields = SFT) -> tuple[str, str]:
    with pytest.raises(RecordProblem) as err:
        to_messages(obj, fields)
    return err.value.reason, err.value.detail


def test_openai_messages_pass_through_and_text_parts_are_joined():
    assert to_messages({"messages": ANSWERED, "id": 3}, SFT) == ANSWERED
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    record = {"messages": [{"role": "user", "content": parts}, ANSWERED[1]]}
    assert to_messages(record, SFT)[0] == {"role": "user", "content": "hi"}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, ANSWERED[1]]}
    assert problem(image) == (
        "invalid_messages",
        "messages[0].content has non-text parts ['image_url']",
    )


def test_sharegpt_roles_system_field_and_tool_turns():
    record = {
        "system": "Be brief.",
        "conversations": [
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"},
            {"from": "tool", "value": "42"},
            {"from": "assistant", "value": "a2"},
        ],
    }
    assert to_messages(record, SFT) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "a2"},
    ]
    # Each list is read by the keys its turns use, whichever name it has.
    assert to_messages({"messages": record["conversations"][:2]}, SFT)[1]["content"] == "a1"
    assert to_messages({"conversations": ANSWERED}, SFT) == ANSWERED


def test_wrong_role_tags_and_missing_keys_name_the_turn_and_the_tag():
    bot = {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}
    reason, detail = problem(bot)
    assert reason == "unknown_role"
    assert detail.startswith("conversations[1].from is 'bot'; known tags: assistant, gpt, human")
    assert "data.sft.columns.roles" in detail
    assert to_messages(bot, RecordFields(mode="sft", roles={"bot": "assistant"}))[1]["role"] == (
        "assistant"
    )
    no_value = {"conversations": [{"from": "human", "text": "q"}]}
    assert problem(no_value) == (
        "missing_field",
        "conversations[0] has no 'value' (fields: from, text)",
    )


def test_alpaca_input_system_and_history():
    record = {
        "instruction": "Translate.",
        "input": "Hallo",
        "output": "Hello",
        "system": "You translate.",
        "history": [["Hi?", "Hi!"]],
    }
    assert to_messages(record, SFT) == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Translate.\nHallo"},
        {"role": "assistant", "content": "Hello"},
    ]
    no_input = to_messages({"instruction": "Say hi.", "input": "", "output": "hi"}, SFT)
    assert no_input == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
    ]
    reason, detail = problem({"instruction": "Say hi."})
    assert (reason, detail) == ("missing_field", "no 'output' field for format alpaca "
                                "(record fields: instruction)")  # fmt: skip
    assert (
        problem({**record, "history": [["only one"]]})[1]
        == "history[0] is not a [user, assistant] pair"
    )


def test_prompt_completion_strings_and_message_lists():
    assert to_messages({"prompt": "hi", "completion": "yo"}, SFT) == ANSWERED
    listed = {"prompt": ANSWERED[:1], "completion": ANSWERED[1:]}
    assert to_messages(listed, SFT) == ANSWERED


def test_column_mapping_from_the_config():
    cfg = DataConfig(mode="sft", sft={"columns": {"messages": "dialog", "role_key": "speaker",
                                                  "content_key": "text", "instruction": "question",
                                                  "output": "answer", "prompt": "q",
                                                  "completion": "a"}})  # fmt: skip
    f = RecordFields.from_config(cfg)
    dialog = {"dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "yo"}]}
    assert to_messages(dialog, f) == ANSWERED
    assert to_messages({"question": "hi", "answer": "yo"}, f) == ANSWERED
    assert to_messages({"q": "hi", "a": "yo"}, f) == ANSWERED
    # data.messages_field still names the messages column when the mapping does not.
    legacy = RecordFields.from_config(DataConfig(mode="sft", messages_field="chat"))
    assert to_messages({"chat": ANSWERED}, legacy) == ANSWERED


def test_detection_is_per_record_and_explicit():
    assert [record_format(r, SFT) for r in (
        {"messages": []}, {"conversations": []}, {"instruction": "x"}, {"output": "x"},
        {"prompt": "x"}, {"text": "x"}, {"messages": None, "prompt": "x"},
    )] == ["messages", "sharegpt", "alpaca", "alpaca", "prompt_completion", None,
           "prompt_completion"]  # fmt: skip
    reason, detail = problem({"dialog": ANSWERED, "id": 1})
    assert reason == "unknown_format"
    assert "(record fields: dialog, id; map yours in data.sft.columns)" in detail
    # A forced format names the missing field and what the record looks like instead.
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    reason, detail = problem(sharegpt, RecordFields(mode="sft", format="alpaca"))
    assert (reason, detail) == ("missing_field", "no 'instruction' field for format alpaca "
                                "(record fields: conversations; it looks like sharegpt)")  # fmt: skip
    reason, detail = problem({"dialog": ANSWERED}, RecordFields(mode="sft", format="messages"))
    assert detail.startswith("no 'messages' field for format messages")


def test_conversations_must_end_on_the_answer():
    assert problem({"messages": ANSWERED[:1]}) == (
        "last_turn_not_assistant",
        "the last of 1 turns is user",
    )
    assert problem({"messages": []})[0] == "invalid_messages"
    assert problem(["not", "an", "object"])[0] == "malformed_json"
