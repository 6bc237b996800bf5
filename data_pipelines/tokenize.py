"""Tokenization: plain documents (ids + EOS) and chat conversations (ids + loss labels).

``encode_conversation`` computes labels from character spans: the assistant part of message i is
the text between the rendering of messages[:i] with the generation prompt and the rendering of
messages[:i+1]. That is the assistant content plus whatever the template closes a turn with (the
end-of-turn token), so the model learns to stop. It works for any HF chat template whose renders
are prefixes of each other, not only raylm's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.pack import IGNORE_INDEX
from data_pipelines.tokenizer_train import CHAT_TEMPLATE, END_OF_TURN, ROLE_TOKENS

__all__ = [
    "TokenizeBatch",
    "add_default_chat_template",
    "check_tokenizer",
    "encode_conversation",
    "load_tokenizer",
    "tokenizer_fingerprint",
]

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def load_tokenizer(path: str | Path):
    """A fast HF tokenizer from a local directory (no hub access)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise DataError(f"tokenizer {path}: not a tokenizer directory (no tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def check_tokenizer(tok, mode: str, path: str | Path) -> None:
    """What packing and SFT labels need from a tokenizer; raised in the driver before Ray work."""
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {path}: no eos_token; packing needs one")
    if mode == "sft" and not tok.chat_template:
        raise DataError(f"tokenizer {path}: no chat_template; sft mode needs one")


def add_default_chat_template(tok) -> list[str]:
    """Give a tokenizer without a chat template raylm's default one (``CHAT_TEMPLATE``), in place.

    The role markers and the end-of-turn token the template writes become special tokens, so each
    is one id that BPE never splits and generation can stop on; eos/bos/pad stay as they were.
    Returns the tokens that were not in the vocabulary: they get new ids at its end, so a model
    trained with this tokenizer needs a larger embedding (``raylm train`` resizes it).
    """
    wanted = [END_OF_TURN, *ROLE_TOKENS]
    missing = [t for t in wanted if t not in tok.get_vocab()]
    unmarked = [t for t in wanted if t not in tok.all_special_tokens]
    if unmarked:
        tok.add_special_tokens(
            {"extra_special_tokens": unmarked}, replace_extra_special_tokens=False
        )
    tok.chat_template = CHAT_TEMPLATE
    return missing


def tokenizer_fingerprint(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        f = Path(path) / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _render(tok, messages: list[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_conversation(tok, messages: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels), both (n,) int32; labels are -100 outside assistant turns."""
    text = _render(tok, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tok, messages[:i], add_generation_prompt=True)) if i else 0
        end = len(_render(tok, messages[: i + 1], add_generation_prompt=False))
        spans.append((start, end))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(s <= a and b <= e for s, e in spans):
            labels[j] = ids[j]
    return ids, labels


class TokenizeBatch:
    """Ray Data callable class: the tokenizer is loaded once per actor.

    Input batch columns: ``reason`` (str, empty when usable) and ``text`` (document text, or the
    messages as JSON in sft mode). Adds ``input_ids`` (and ``labels`` in sft mode) as int32 arrays and
    ``n_tokens``; rejects over-long conversations as ``too_long`` (or truncates, per config).
    """

    def __init__(
        self,
        tokenizer_path: str,
        mode: str,
        seq_len: int,
        overlong: str = "drop",
        eos_id: int | None = None,
    ):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.mode, self.seq_len, self.overlong = mode, seq_len, overlong
        raw = Path(tokenizer_path) / "tokenizer.json"
        if mode == "pretrain" and eos_id is not None and raw.is_file():
            # Plain documents need only the Rust tokenizer: skipping transformers (and the torch it
            # imports) keeps each actor ~200 MB smaller. Same encode_batch, same ids.
            from tokenizers import Tokenizer

            self.raw, self.tok, self.eos_id = Tokenizer.from_file(str(raw)), None, eos_id
            return
        self.raw, self.tok = None, load_tokenizer(tokenizer_path)
        check_tokenizer(self.tok, mode, tokenizer_path)
        self.eos_id = self.tok.eos_token_id

    def _encode_documents(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.raw is not None:
            return [e.ids for e in self.raw.encode_batch(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        reasons = batch["reason"].copy()
        keep = [i for i, r in enumerate(reasons) if not r]
        ids_col = np.empty(len(reasons), dtype=object)
        labels_col = np.empty(len(reasons), dtype=object)
        truncated = np.zeros(len(reasons), dtype=np.bool_)
        empty = np.zeros(0, dtype=np.int32)
        ids_col[:] = [empty] * len(reasons)
        labels_col[:] = [empty] * len(reasons)
        if self.mode == "pretrain":
            texts = [batch["text"][i] for i in keep]
            encoded = self._encode_documents(texts)
            for i, ids in zip(keep, encoded, strict=True):
                ids_col[i] = np.asarray([*ids, self.eos_id], dtype=np.int32)
        else:
            for i in keep:
                ids, labels = encode_conversation(self.tok, json.loads(batch["text"][i]))
                if len(ids) > self.seq_len:
                    if self.overlong == "drop":
                        reasons[i] = "too_long"
                        continue
                    ids, labels, truncated[i] = ids[: self.seq_len], labels[: self.seq_len], True
                ids_col[i], labels_col[i] = ids, labels
        out = {k: v for k, v in batch.items() if k != "text"}
        out.update(reason=reasons, input_ids=ids_col, truncated=truncated)
        out["n_tokens"] = np.asarray([len(x) for x in ids_col], dtype=np.int64)
        if self.mode == "sft":
            out["labels"] = labels_col
        return out
