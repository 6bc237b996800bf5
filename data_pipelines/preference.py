"""Preference records -> (prompt messages, chosen answer, rejected answer), checked.

Two shapes, as the usual preference datasets come:

- explicit prompt: ``prompt`` (a string, or a message list ending on a user or tool turn) with
  ``chosen`` and ``rejected`` answers (strings, an assistant message, or a one-message list of it);
- whole conversations: ``chosen`` and ``rejected`` are full dialogues that share their history and
  differ in the last assistant turn (TRL's implicit-prompt rows; Anthropic HH, either converted to
  message lists or as its raw ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` strings). The pair is
  split at the last assistant turn, and the histories must be identical: a pair whose prompts
  differ compares two answers to different questions.

Field names follow ``data.sft.columns`` (``prompt``, ``chosen``, ``rejected``). Problems raise
:class:`~data_pipelines.formats.RecordProblem`, counted with the record's ``file:line``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from data_pipelines.formats import RecordFields, RecordProblem, turns

__all__ = ["PreferencePair", "split_preference"]

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict[str, str]]  # ends on a user (or tool) turn
    chosen: str
    rejected: str

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def _malformed(detail: str) -> RecordProblem:
    return RecordProblem("malformed_preference", detail)


def _is_hh(value: Any) -> bool:
    return isinstance(value, str) and "\n\nHuman:" in value and "\n\nAssistant:" in value


def _is_dialogue(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 1) or _is_hh(value)


def _hh_turns(text: str, name: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise _malformed(f"'{name}' is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogue")
    return [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
            for who, body in zip(parts[1::2], parts[2::2], strict=True)]  # fmt: skip


def _dialogue(value: Any, name: str, f: RecordFields) -> tuple[list[dict[str, str]], str]:
    """(history, last assistant answer) of a whole conversation."""
    if isinstance(value, str) and not _is_hh(value):
        raise _malformed(
            f"'{name}' is a single answer while the other side is a whole "
            "conversation; give both as conversations, or both as answers"
        )
    messages = _hh_turns(value, name) if isinstance(value, str) else turns(value, name, f)
    if messages[-1]["role"] != "assistant":
        raise _malformed(f"'{name}' ends on a {messages[-1]['role']} turn, not the answer")
    return messages[:-1], messages[-1]["content"]


def _answer(value: Any, name: str, f: RecordFields) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if not (isinstance(value, list) and len(value) == 1):
        raise _malformed(f"'{name}' is not an answer (a string or one assistant message)")
    (message,) = turns(value, name, f)
    if message["role"] != "assistant":
        raise _malformed(f"'{name}' is a {message['role']} message, not the assistant's")
    return message["content"]


def _prompt(value: Any, f: RecordFields) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return turns(value, f.prompt, f)


def _shared_history(obj: Mapping, f: RecordFields) -> tuple[list[dict[str, str]], str, str]:
    chosen_history, chosen = _dialogue(obj[f.chosen], f.chosen, f)
    rejected_history, rejected = _dialogue(obj[f.rejected], f.rejected, f)
    if chosen_history != rejected_history:
        at = next((i for i, (a, b) in enumerate(zip(chosen_history, rejected_history, strict=False))
                   if a != b), min(len(chosen_history), len(rejected_history)))  # fmt: skip
        raise RecordProblem("history_mismatch", f"'{f.chosen}' and '{f.rejected}' differ at turn "
                            f"{at}, before their last assistant turn")  # fmt: skip
    if obj.get(f.prompt) is not None and _prompt(obj[f.prompt], f) != chosen_history:
        raise RecordProblem("history_mismatch", f"'{f.prompt}' is not the history that "
                            f"'{f.chosen}' and '{f.rejected}' share")  # fmt: skip
    return chosen_history, chosen, rejected


def _checked(pair: PreferencePair, f: RecordFields) -> PreferencePair:
    if not pair.prompt:
        raise _malformed("no prompt: the conversations hold only the answer")
    if pair.prompt[-1]["role"] == "assistant":
        raise _malformed(f"'{f.prompt}' ends on an assistant turn; the answers would follow it")
    for name, text in ((f.chosen, pair.chosen), (f.rejected, pair.rejected)):
        if not text.strip():
            raise RecordProblem("empty_answer", f"the '{name}' answer is empty")
    if pair.chosen.split() == pair.rejected.split():
        raise RecordProblem(
            "identical_answers", f"'{f.chosen}' and '{f.rejected}' are the same text"
        )
    return pair


def split_preference(obj: Any, f: RecordFields | None = None) -> PreferencePair:
    """One preference record as (prompt messages, chosen text, rejected text).

    Raises :class:`RecordProblem`: ``missing_field``, ``malformed_preference``,
    ``history_mismatch``, ``empty_answer``, ``identical_answers`` (same text up to whitespace),
    or a message-level reason (``unknown_role``, ``invalid_messages``, ...).
    """
    f = f or RecordFields(mode="preference")
    if not isinstance(obj, dict):
        raise RecordProblem(
            "malformed_json", f"a record is a JSON object, not {type(obj).__name__}"
        )
    for key in (f.chosen, f.rejected):
        if obj.get(key) is None:
            fields = ", ".join(sorted(k for k, v in obj.items() if v is not None)) or "none"
            raise RecordProblem("missing_field", f"no '{key}' field (record fields: {fields})")
    if _is_dialogue(obj[f.chosen]) or _is_dialogue(obj[f.rejected]):
        prompt, chosen, rejected = _shared_history(obj, f)
    elif obj.get(f.prompt) is None:
        raise RecordProblem("missing_field", f"no '{f.prompt}' field, and '{f.chosen}'/"
                            f"'{f.rejected}' are not whole conversations")  # fmt: skip
    else:
        prompt = _prompt(obj[f.prompt], f)
        chosen = _answer(obj[f.chosen], f.chosen, f)
        rejected = _answer(obj[f.rejected], f.rejected, f)
    return _checked(PreferencePair(prompt, chosen, rejected), f)
