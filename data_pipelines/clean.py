"""Pure text cleaning: unicode normalization, whitespace, PII redaction, content hashing.

Every function here is plain Python, unit-tested without Ray, and used inside Ray Data batch UDFs.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

__all__ = [
    "PII_PLACEHOLDERS",
    "content_hash",
    "is_validation",
    "normalize_text",
    "redact_pii",
]

PII_PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "card": "<CARD>"}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_TRAILING = re.compile(r"[ \t]+\n")

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(
    r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b"
)
# 13-19 digits, optionally grouped by single spaces or dashes; confirmed by the Luhn checksum below.
_CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
# International or national numbers with separators: +1 415 555 0132, (020) 7946 0958, 555-867-5309.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}\b"
)


def normalize_text(text: str, unicode_form: str = "NFC", collapse_whitespace: bool = True) -> str:
    """Canonical form used for filtering, dedup and tokenization."""
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if collapse_whitespace:
        text = _SPACES.sub(" ", text)
        text = _TRAILING.sub("\n", text)
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def redact_pii(text: str, kinds: Iterable[str]) -> tuple[str, dict[str, int]]:
    """Replace personal data with placeholders. Returns (text, count per kind).

    Order matters: e-mails first (they contain digits and dots), then card numbers (long digit runs
    that would otherwise read as phones), then IPs, then phones.
    """
    kinds = set(kinds)
    counts = {k: 0 for k in PII_PLACEHOLDERS if k in kinds}

    def sub(pattern: re.Pattern[str], kind: str, s: str, check=None) -> str:
        def repl(m: re.Match[str]) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PII_PLACEHOLDERS[kind]

        return pattern.sub(repl, s)

    if "email" in kinds:
        text = sub(_EMAIL, "email", text)
    if "card" in kinds:
        text = sub(_CARD, "card", text, lambda s: _luhn_ok(re.sub(r"[ -]", "", s)))
    if "ip" in kinds:
        text = sub(_IPV4, "ip", text)
    if "phone" in kinds:
        text = sub(_PHONE, "phone", text)
    return text, counts


def content_hash(text: str) -> bytes:
    """16-byte BLAKE2b digest of the normalized text: the dedup key and the split key."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def is_validation(digest: bytes, fraction: float) -> bool:
    """Deterministic split by content: the same document lands in the same split on every run."""
    if fraction <= 0.0:
        return False
    return int.from_bytes(digest[8:16], "big") < fraction * 2**64
