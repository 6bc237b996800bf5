"""Chat record formats -> OpenAI-style messages: the one place that knows ShareGPT, Alpaca and
prompt/completion records.

SFT data comes in the shape of whatever tool wrote it. Every record is turned into
``[{"role", "content"}, ...]`` here, before cleaning and tokenization, so the rest of the pipeline
sees one shape. Detection is explicit and per record: ``auto`` looks at which (mapped) fields a
record has, in a fixed order, and a record that fits no format is rejected as ``unknown_format``,
never guessed at. Problems are raised as :class:`RecordProblem` (a rejection reason and a one-line
detail naming the field), which the reader counts with the record's ``file:line``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_pipelines.config import DataConfig

__all__ = [
    "ROLES",
    "SFT_FORMATS",
    "SHAREGPT_TAGS",
    "RecordFields",
    "RecordProblem",
    "check_conversation",
    "record_format",
    "to_messages",
    "turns",
]

ROLES = ("system", "user", "assistant", "tool")
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
# Role tags as ShareGPT exports spell them (FastChat, LLaMA-Factory), plus the OpenAI role names
# themselves, which ShareGPT-style files often use too. More come from data.sft.columns.roles.
SHAREGPT_TAGS = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
}


class RecordProblem(ValueError):
    """A record that cannot be used: ``reason`` is the counted rejection reason, ``detail`` says
    which field is wrong and how, in one line."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class RecordFields:
    """Where a record keeps each part, after ``data.sft.columns`` (the standard names by default).

    ``role_key``/``content_key`` None: ``role``/``content`` in OpenAI messages, ``from``/``value``
    in ShareGPT conversations. ``roles`` adds role tags (e.g. ``{"bot": "assistant"}``).
    """

    mode: str = "pretrain"  # pretrain | sft | preference
    format: str = "auto"  # auto or one of SFT_FORMATS
    text: str = "text"
    messages: str = "messages"
    conversations: str = "conversations"
    role_key: str | None = None
    content_key: str | None = None
    roles: Mapping[str, str] = field(default_factory=dict)
    system: str = "system"
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    history: str = "history"
    prompt: str = "prompt"
    completion: str = "completion"
    chosen: str = "chosen"
    rejected: str = "rejected"

    @classmethod
    def from_config(cls, cfg: DataConfig) -> RecordFields:
        c = cfg.sft.columns
        names = c.model_dump(exclude={"messages", "roles"})
        return cls(mode=cfg.mode, format=cfg.sft.format, text=cfg.text_field,
                   messages=c.messages or cfg.messages_field, roles=dict(c.roles),
                   **names)  # fmt: skip

    @property
    def tags(self) -> dict[str, str]:
        return {**SHAREGPT_TAGS, **self.roles}

    def columns(self) -> set[str]:
        """Every record field a chat or preference record may use (parquet reads only these)."""
        names = (self.messages, self.conversations, self.system, self.instruction, self.input,
                 self.output, self.history, self.prompt, self.completion, self.chosen,
                 self.rejected)  # fmt: skip
        return set(names)


def _has(obj: Mapping, key: str) -> bool:
    return obj.get(key) is not None


def record_format(obj: Mapping[str, Any], f: RecordFields) -> str | None:
    """The format a record's fields say it is in, or None. First match wins, in this order:
    messages, conversations (ShareGPT), instruction/output (Alpaca), prompt/completion."""
    if _has(obj, f.messages):
        return "messages"
    if _has(obj, f.conversations):
        return "sharegpt"
    if _has(obj, f.instruction) or _has(obj, f.output):
        return "alpaca"
    if _has(obj, f.prompt) or _has(obj, f.completion):
        return "prompt_completion"
    return None


def _keys(obj: Mapping) -> str:
    return ", ".join(sorted(str(k) for k, v in obj.items() if v is not None)) or "none"


def _require(obj: Mapping, key: str, fmt: str, f: RecordFields) -> Any:
    if not _has(obj, key):
        seen = record_format(obj, f)
        hint = f"; it looks like {seen}" if seen and seen != fmt else ""
        raise RecordProblem("missing_field", f"no '{key}' field for format {fmt} "
                            f"(record fields: {_keys(obj)}{hint})")  # fmt: skip
    return obj[key]


def _text(value: Any, where: str) -> str:
    """A message content: a string, or OpenAI's list of text parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        kinds = {p.get("type") for p in value}
        if kinds <= {"text"} and all(isinstance(p.get("text"), str) for p in value):
            return "".join(p["text"] for p in value)
        raise RecordProblem(
            "invalid_messages", f"{where} has non-text parts {sorted(map(str, kinds))}"
        )
    raise RecordProblem("invalid_messages", f"{where} is {type(value).__name__}, not a string")


def _keys_of(items: list, f: RecordFields, sharegpt: bool) -> tuple[str, str]:
    """Role and content keys: configured, else the ones the first turn uses (``from``/``value``
    or ``role``/``content``: both spellings turn up under either list name), else the format's."""
    first = items[0] if isinstance(items[0], dict) else {}
    if "from" in first and "role" not in first:
        role, content = "from", "value"
    elif "role" in first:
        role, content = "role", "content"
    else:
        role, content = ("from", "value") if sharegpt else ("role", "content")
    return f.role_key or role, f.content_key or content


def turns(value: Any, name: str, f: RecordFields, sharegpt: bool = False) -> list[dict[str, str]]:
    """A list of turns (OpenAI ``role``/``content`` or ShareGPT ``from``/``value``) as messages."""
    if not isinstance(value, list) or not value:
        raise RecordProblem("invalid_messages", f"'{name}' is not a non-empty list of turns")
    role_key, content_key = _keys_of(value, f, sharegpt)
    tags = f.tags
    out = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise RecordProblem("invalid_messages", f"{where} is not an object")
        for key in (role_key, content_key):
            if key not in turn:
                raise RecordProblem(
                    "missing_field", f"{where} has no '{key}' (fields: {_keys(turn)})"
                )
        tag = turn[role_key]
        role = tags.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise RecordProblem("unknown_role", f"{where}.{role_key} is {tag!r}; known tags: "
                                f"{', '.join(sorted(tags))} (add one in data.sft.columns.roles)")  # fmt: skip
        out.append({"role": role, "content": _text(turn[content_key], f"{where}.{content_key}")})
    return out


def check_conversation(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The last turn must be the assistant's: SFT learns the replies, and a conversation that ends
    on another turn has an unanswered prompt at its end (usually a truncated or mis-exported
    record)."""
    last = messages[-1]["role"]
    if last != "assistant":
        raise RecordProblem(
            "last_turn_not_assistant", f"the last of {len(messages)} turns is {last}"
        )
    return messages


def _optional_text(obj: Mapping, key: str) -> str:
    value = obj.get(key)
    return "" if value is None else _text(value, key)


def _history(value: Any, key: str) -> list[dict[str, str]]:
    """Alpaca ``history``: earlier [user, assistant] pairs, oldest first."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RecordProblem("invalid_messages", f"'{key}' is not a list of [user, assistant] pairs")
    out = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordProblem("invalid_messages", f"{key}[{i}] is not a [user, assistant] pair")
        out += [{"role": "user", "content": _text(pair[0], f"{key}[{i}][0]")},
                {"role": "assistant", "content": _text(pair[1], f"{key}[{i}][1]")}]  # fmt: skip
    return out


def _from_alpaca(obj: Mapping, f: RecordFields) -> list[dict[str, str]]:
    instruction = _text(_require(obj, f.instruction, "alpaca", f), f.instruction)
    output = _text(_require(obj, f.output, "alpaca", f), f.output)
    # LLaMA-Factory's rule: the input, when there is one, goes on a new line after the instruction.
    query = "\n".join(x for x in (instruction, _optional_text(obj, f.input)) if x)
    system = _optional_text(obj, f.system)
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *_history(obj.get(f.history), f.history),
            {"role": "user", "content": query}, {"role": "assistant", "content": output}]  # fmt: skip


def _from_prompt_completion(obj: Mapping, f: RecordFields) -> list[dict[str, str]]:
    prompt = _require(obj, f.prompt, "prompt_completion", f)
    completion = _require(obj, f.completion, "prompt_completion", f)
    if isinstance(prompt, list):
        head = turns(prompt, f.prompt, f)
    else:
        head = [{"role": "user", "content": _text(prompt, f.prompt)}]
    if isinstance(completion, list):
        return head + turns(completion, f.completion, f)
    return head + [{"role": "assistant", "content": _text(completion, f.completion)}]


def to_messages(obj: Any, f: RecordFields) -> list[dict[str, str]]:
    """One SFT record as messages ending on the assistant's turn; raises :class:`RecordProblem`."""
    if not isinstance(obj, dict):
        raise RecordProblem(
            "malformed_json", f"a record is a JSON object, not {type(obj).__name__}"
        )
    fmt = record_format(obj, f) if f.format == "auto" else f.format
    if fmt is None:
        raise RecordProblem("unknown_format", f"no {f.messages}, {f.conversations}, "
                            f"{f.instruction}/{f.output} or {f.prompt}/{f.completion} field "
                            f"(record fields: {_keys(obj)}; map yours in data.sft.columns)")  # fmt: skip
    if fmt == "messages":
        messages = turns(_require(obj, f.messages, fmt, f), f.messages, f)
    elif fmt == "sharegpt":
        messages = turns(_require(obj, f.conversations, fmt, f), f.conversations, f, sharegpt=True)
        # ShareGPT keeps the system prompt in its own field in many exports (LLaMA-Factory).
        system = _optional_text(obj, f.system)
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
    elif fmt == "alpaca":
        messages = _from_alpaca(obj, f)
    else:
        messages = _from_prompt_completion(obj, f)
    return check_conversation(messages)
