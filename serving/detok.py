"""Incremental detokenization with stop strings.

Text is released as soon as it is final: a trailing incomplete UTF-8 sequence (decoded as U+FFFD)
and any tail that could still grow into a stop string are held back, so a stop string never reaches
the client even when it spans several tokens.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas.

    Decodes a sliding window of ids (the last few already-final tokens + new ones) instead of the whole
    output each step, so the cost per token stays constant.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self.text = ""  # final text so far (released + held back), stop string excluded
        self._released = 0  # chars of self.text already returned
        self._prefix_start = 0  # window start in _ids
        self._prefix_end = 0  # window ids already folded into self.text
        self._prefix_text = ""  # decode(_ids[_prefix_start:_prefix_end])
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _extend(self, token_id: int) -> None:
        """Append one token and fold any completed characters into self.text."""
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix_start :])
        if window.endswith(_REPLACEMENT):
            return  # incomplete UTF-8: wait for the next byte-level token
        new = window[len(self._prefix_text) :]
        self.text += new
        # Keep a short window of context so leading-space handling stays correct.
        self._prefix_start = max(0, len(self._ids) - 4)
        self._prefix_end = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_start : self._prefix_end])

    def _held_tail(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        pending = self.text[self._released :]
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the newly final text (maybe ""). Sets ``stopped``."""
        if self.stopped:
            return ""
        self._extend(token_id)
        if self._stop:
            start = max(0, self._released)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_tail())

    def flush(self) -> str:
        """At the end of generation: release everything still held back."""
        if not self.stopped and self._prefix_end < len(self._ids):
            # Trailing bytes never completed a character; emit them as decoded.
            self.text += self._decode(self._ids[self._prefix_start :])[len(self._prefix_text) :]
            self._prefix_end = len(self._ids)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self._released:
            return ""
        out = self.text[self._released : upto]
        self._released = upto
        return out
