"""`data prepare`'s per-shard step without Ray: chat and preference records, strict errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipelines.config import DataConfig
from data_pipelines.errors import DataError
from data_pipelines.prepare import parse_and_clean

SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi  there"}, {"from": "gpt", "value": "Hello"}]},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
]


def _shard(name: str, rows: list[dict]) -> dict[str, np.ndarray]:
    blob = "\n".join(json.dumps(r) for r in rows).encode()
    return {"path": np.asarray([name], dtype=object), "bytes": np.asarray([blob], dtype=object)}


def test_chat_records_are_normalised_and_rejections_carry_their_detail():
    cfg = DataConfig(mode="sft")
    out = parse_and_clean(_shard("c.jsonl", SHAREGPT), cfg, {})
    assert list(out["reason"]) == ["", "unknown_role"]
    assert json.loads(out["text"][0]) == [
        {"content": "Hi there", "role": "user"},
        {"content": "Hello", "role": "assistant"},
    ]
    assert out["detail"][1].startswith("conversations[1].from is 'bot'")


def test_strict_mode_names_file_line_reason_and_field():
    cfg = DataConfig(mode="sft", strict=True)
    with pytest.raises(DataError) as err:
        parse_and_clean(_shard("c.jsonl", SHAREGPT), cfg, {})
    assert str(err.value).startswith(
        "c.jsonl:2: unknown_role: conversations[1].from is 'bot'; known tags: "
    )
    assert str(err.value).endswith("(data.strict is on)")


def test_preference_records_are_cleaned_as_a_pair():
    cfg = DataConfig(mode="preference", pii={"enabled": True})
    rows = [
        {"prompt": "Mail  me", "chosen": "At ana@example.com", "rejected": "No."},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
    ]
    out = parse_and_clean(_shard("p.jsonl", rows), cfg, {})
    assert list(out["reason"]) == ["", "identical_answers"]
    assert json.loads(out["text"][0]) == {
        "prompt": [{"content": "Mail me", "role": "user"}],
        "chosen": "At <EMAIL>",
        "rejected": "No.",
    }
    assert list(out["pii_email"]) == [1, 0]
