"""Tokenization: plain documents (ids + EOS), chat conversations and preference pairs (ids + loss
labels).

``encode_conversation`` computes labels from character spans of the rendered conversation: an
assistant turn's loss covers exactly its content and the end-of-turn token that closes it
(``data_pipelines.chat.end_of_turn_token``), so the model learns to stop. It never covers the role
header or generation prompt before the content (the turn starts where the rendering of the earlier
messages with the generation prompt ends), nor what a template writes after the end-of-turn token
(the newline of ChatML/Qwen and Gemma, the eos Phi-3 appends). It works for any HF chat template
that writes each assistant content verbatim (or trimmed), not only raylm's own.

What a template cannot render is found once per tokenizer by rendering probes
(:func:`template_traits`): a system message (Gemma raises, Mistral v0.3 drops it) or a tool turn.
Such records are rejected with their own reason, or the system text goes before the first user turn
when ``data.sft.system_fallback`` says so; never dropped silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.chat import end_of_turn_token
from data_pipelines.errors import DataError
from data_pipelines.formats import RecordProblem
from data_pipelines.pack import IGNORE_INDEX
from data_pipelines.tokenizer_train import CHAT_TEMPLATE, END_OF_TURN, ROLE_TOKENS

__all__ = [
    "TemplateTraits",
    "TokenizeBatch",
    "add_default_chat_template",
    "check_tokenizer",
    "encode_conversation",
    "fit_to_template",
    "load_tokenizer",
    "template_traits",
    "tokenizer_fingerprint",
]

_PROBE = "raylm-probe-5c1e"  # message content whose presence in a rendering shows it was kept

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


# tokenizer_config.json classes that are transformers' plain `tokenizers` wrapper (what
# `raylm tokenizer train` writes): AutoTokenizer would resolve them to that same class.
_PLAIN_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(path: str | Path):
    """A fast HF tokenizer from a local directory (no hub access).

    A plain ``tokenizer.json`` tokenizer loads through its class directly: the same object that
    AutoTokenizer gives, without AutoTokenizer's imports (torch among them, ~2 s of every
    tokenizing actor's start). Any other class (the model families' own) goes through AutoTokenizer.
    """
    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise DataError(f"tokenizer {path}: not a tokenizer directory (no tokenizer.json)")
    if (p / "tokenizer.json").is_file() and _tokenizer_class(p) in _PLAIN_CLASSES:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def _tokenizer_class(p: Path) -> str | None:
    try:
        cfg = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # AutoTokenizer reads it again and names the problem
    return cfg.get("tokenizer_class") if isinstance(cfg, dict) else None


def check_tokenizer(tok, mode: str, path: str | Path) -> None:
    """What packing and SFT labels need from a tokenizer; raised in the driver before Ray work."""
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {path}: no eos_token; packing needs one")
    if mode != "pretrain" and not tok.chat_template:
        raise DataError(f"tokenizer {path}: no chat_template; {mode} mode needs one")
    if mode != "pretrain":
        template_traits(tok, path)  # raises when no end-of-turn token closes an assistant turn


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


@dataclass(frozen=True)
class TemplateTraits:
    """What a tokenizer's chat template does with turns, found once by rendering probes."""

    end_of_turn: str  # the token text that closes an assistant turn
    system: bool  # renders a system message (Gemma raises on one, Mistral v0.3 drops it)
    tool: bool  # renders a tool turn


def _keeps(tok, messages: list[dict]) -> bool:
    """Whether the template renders ``messages`` without raising and keeps the probe text."""
    try:
        return _PROBE in _render(tok, messages, add_generation_prompt=False)
    except Exception:  # raise_exception() in the template, or a role it has no branch for
        return False


def template_traits(tok, path: str | Path = "") -> TemplateTraits:
    """The end-of-turn token and the roles ``tok``'s chat template can render.

    Raises DataError when the template writes no special token after an assistant turn (the
    vocabulary's known end-of-turn tokens are no help then: the labels need the one it writes).
    """
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    probe = {"role": "assistant", "content": _PROBE}
    if not _keeps(tok, [user, probe]):
        raise DataError(f"tokenizer {path}: its chat template does not render a user turn "
                        "followed by an answer")  # fmt: skip
    after = _render(tok, [user, probe], add_generation_prompt=False).split(_PROBE)[-1]
    eot = end_of_turn_token(tok)
    if not eot or eot not in after:
        raise DataError(f"tokenizer {path}: its chat template closes an assistant turn with no "
                        "special token; SFT labels need an end-of-turn token to learn to stop")  # fmt: skip
    system = _keeps(tok, [{"role": "system", "content": _PROBE}, user, answer])
    tool = _keeps(tok, [user, answer, {"role": "tool", "content": _PROBE}, answer])
    return TemplateTraits(eot, system, tool)


def fit_to_template(
    messages: list[dict[str, str]], traits: TemplateTraits, system_fallback: str = "reject"
) -> list[dict[str, str]]:
    """``messages`` as the template can render them; raises :class:`RecordProblem` otherwise.

    ``system_fallback="prepend"``: system text goes before the first user turn's content (what
    Gemma's documentation does for its system-less template), separated by a blank line.
    """
    tool_at = next((i for i, m in enumerate(messages) if m["role"] == "tool"), None)
    if tool_at is not None and not traits.tool:
        raise RecordProblem("tool_not_supported", f"turn {tool_at} is a tool turn; the chat "
                            "template renders no tool role")  # fmt: skip
    if traits.system or all(m["role"] != "system" for m in messages):
        return messages
    if system_fallback != "prepend":
        raise RecordProblem("system_not_supported", "a system message, and the chat template has "
                            "no system role (data.sft.system_fallback: prepend puts it before "
                            "the first user turn)")  # fmt: skip
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first is None:
        raise RecordProblem("system_not_supported", "no user turn to put the system message in")
    rest[first] = {"role": "user", "content": f"{system}\n\n{rest[first]['content']}"}
    return rest


def _assistant_spans(
    tok, messages: list[dict[str, str]], text: str, eot: str
) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant content plus its end-of-turn token."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The turn starts after the prompt the model would be given for it (header included).
        prompt = _render(tok, messages[:i], add_generation_prompt=True) if i else ""
        start = max(cursor, len(prompt)) if text.startswith(prompt) else cursor
        content = m["content"].strip()  # Llama 3, Gemma and Mistral templates trim it
        a = text.find(content, start)
        end = text.find(eot, a + len(content)) if a >= 0 else -1
        if end < 0:
            raise RecordProblem("chat_template_error", f"assistant turn {i}: its content and "
                                f"{eot} are not in the template's rendering")  # fmt: skip
        cursor = end + len(eot)
        spans.append((a, cursor))
    return spans


def encode_conversation(
    tok, messages: list[dict[str, Any]], end_of_turn: str | None = None, last_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels), both (n,) int32; labels are -100 outside assistant turns.

    A token carries loss when it overlaps an assistant span, so a token that joins the space
    before an answer to its first word (Mistral's ``[/INST] answer``) is learned too.
    ``last_only``: only the last assistant turn carries loss (a preference answer after its
    history). ``end_of_turn``: the token closing a turn; default: from the template.
    """
    eot = end_of_turn or end_of_turn_token(tok)
    if not eot:
        raise DataError("chat template: no end-of-turn token after an assistant turn")
    text = _render(tok, messages, add_generation_prompt=False)
    spans = _assistant_spans(tok, messages, text, eot)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (n, 2) chars
    carries = np.zeros(len(ids), dtype=bool)
    for s, e in spans[-1:] if last_only else spans:
        carries |= (offsets[:, 0] < e) & (offsets[:, 1] > s) & (offsets[:, 1] > offsets[:, 0])
    labels = np.where(carries, ids, IGNORE_INDEX).astype(np.int32)
    return ids, labels


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _empty_column(n: int) -> np.ndarray:
    col = np.empty(n, dtype=object)
    col[:] = [np.zeros(0, dtype=np.int32)] * n
    return col


class TokenizeBatch:
    """Ray Data callable class: the tokenizer is loaded once per actor.

    Input batch columns: ``reason`` (str, empty when usable), ``text`` (document text; sft: the
    messages as JSON; preference: {prompt, chosen, rejected} as JSON) and optionally ``detail``.
    Adds ``input_ids`` (and ``labels`` unless pretraining) as int32 arrays, ``n_tokens`` and
    ``truncated``; preference adds ``rejected_input_ids``/``rejected_labels`` (``input_ids``/
    ``labels`` are the chosen answer's). Rejects what the chat template cannot render
    (``fit_to_template``) and over-long records as ``too_long`` (or truncates, per config).
    """

    def __init__(
        self,
        tokenizer_path: str,
        mode: str,
        seq_len: int,
        overlong: str = "drop",
        eos_id: int | None = None,
        system_fallback: str = "reject",
    ):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.mode, self.seq_len, self.overlong = mode, seq_len, overlong
        self.system_fallback = system_fallback
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
        if mode != "pretrain":
            self.traits = template_traits(self.tok, tokenizer_path)

    def _encode_documents(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.raw is not None:
            return [e.ids for e in self.raw.encode_batch(texts, add_special_tokens=False)]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def _encode_chat(self, messages: list[dict], last_only: bool) -> tuple[np.ndarray, np.ndarray]:
        """Raises RecordProblem for what the template cannot render (or raises on)."""
        from jinja2.exceptions import TemplateError

        messages = fit_to_template(messages, self.traits, self.system_fallback)
        try:
            return encode_conversation(self.tok, messages, self.traits.end_of_turn, last_only)
        except TemplateError as exc:  # raise_exception() in the template: roles, order
            raise RecordProblem("chat_template_error", _one_line(exc)) from None

    def _encode_record(self, text: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, labels) per sequence: one conversation, or a preference pair's two."""
        if self.mode == "sft":
            return [self._encode_chat(json.loads(text), last_only=False)]
        pair = json.loads(text)
        return [self._encode_chat([*pair["prompt"], {"role": "assistant", "content": pair[k]}],
                                  last_only=True) for k in ("chosen", "rejected")]  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["reason"])
        reasons = batch["reason"].copy()
        details = batch["detail"].copy() if "detail" in batch else np.full(n, "", dtype=object)
        keep = [i for i, r in enumerate(reasons) if not r]
        columns = [_empty_column(n) for _ in range(2 if self.mode != "preference" else 4)]
        truncated = np.zeros(n, dtype=np.bool_)
        if self.mode == "pretrain":
            encoded = self._encode_documents([batch["text"][i] for i in keep])
            for i, ids in zip(keep, encoded, strict=True):
                columns[0][i] = np.asarray([*ids, self.eos_id], dtype=np.int32)
        for i in keep if self.mode != "pretrain" else ():
            try:
                seqs = self._encode_record(batch["text"][i])
            except RecordProblem as problem:
                reasons[i], details[i] = problem.reason, problem.detail
                continue
            if max(len(ids) for ids, _ in seqs) > self.seq_len:
                if self.overlong == "drop":
                    reasons[i] = "too_long"
                    continue
                seqs, truncated[i] = [(x[: self.seq_len], y[: self.seq_len]) for x, y in seqs], True
            for k, (ids, labels) in enumerate(seqs):
                columns[2 * k][i], columns[2 * k + 1][i] = ids, labels
        out = {k: v for k, v in batch.items() if k != "text"}
        out.update(reason=reasons, detail=details, input_ids=columns[0], truncated=truncated)
        if self.mode != "pretrain":
            out["labels"] = columns[1]
        if self.mode == "preference":
            out["rejected_input_ids"], out["rejected_labels"] = columns[2], columns[3]
        ids_columns = [c for c in out if c.endswith("input_ids")]
        out["n_tokens"] = np.asarray(
            [sum(len(out[c][i]) for c in ids_columns) for i in range(n)], dtype=np.int64
        )
        return out
