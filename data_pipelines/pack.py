"""Packing tokenized documents into rows of exactly ``seq_len`` tokens.

Packers are streaming and sequential: rows depend only on the order of the documents fed in, never
on how Ray split them into blocks, which is what makes prepared datasets byte-identical across
actor counts and block sizes.

Row layout (all int32, shape (seq_len,)):
- ``input_ids``: tokens; the tail of a split's last row is ``pad_id``.
- ``position_ids``: restart at 0 at each document start and at each row start (a document cut by a
  row boundary continues at position 0 in the next row); padding forms its own 0.. segment.
- ``labels`` (sft only): the token itself where it carries loss, -100 elsewhere (HF convention: the
  model shifts labels internally).

Preference pairs are not packed: one pair per row (``PairRow``), each side unpadded (at most
seq_len tokens), so a trainer pads a batch only to its longest sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "ConversationPacker",
    "DocumentPacker",
    "PackedRow",
    "PairRow",
    "PairRows",
    "segment_positions",
]

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    input_ids: np.ndarray  # (seq_len,) int32
    position_ids: np.ndarray  # (seq_len,) int32
    labels: np.ndarray | None  # (seq_len,) int32 or None
    real_tokens: int  # tokens that are not padding


@dataclass
class PairRow:
    """One preference pair; each side (n,) int32, labels -100 outside its answer."""

    chosen_input_ids: np.ndarray
    chosen_labels: np.ndarray
    rejected_input_ids: np.ndarray
    rejected_labels: np.ndarray

    @property
    def real_tokens(self) -> int:
        return len(self.chosen_input_ids) + len(self.rejected_input_ids)


class PairRows:
    """The preference "packer": each pair becomes its own row, as it is."""

    def add(self, chosen_ids, chosen_labels, rejected_ids, rejected_labels) -> Iterator[PairRow]:
        yield PairRow(*(np.asarray(x, dtype=np.int32) for x in
                        (chosen_ids, chosen_labels, rejected_ids, rejected_labels)))  # fmt: skip

    def flush(self) -> Iterator[PairRow]:
        return iter(())


def segment_positions(lengths: list[int]) -> np.ndarray:
    """Concatenated ``arange(n)`` for each segment length."""
    if not lengths:
        return np.zeros(0, dtype=np.int32)
    total = int(sum(lengths))
    starts = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
    return (np.arange(total) - starts).astype(np.int32)


class DocumentPacker:
    """Pretraining packer: documents (already ending in EOS) concatenated and cut every seq_len."""

    def __init__(self, seq_len: int, pad_id: int):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self._ids: list[np.ndarray] = []
        self._lens: list[int] = []  # lengths of the segments in the buffer (documents or fragments)
        self._buffered = 0

    def add(self, ids: np.ndarray) -> Iterator[PackedRow]:
        ids = np.asarray(ids, dtype=np.int32)
        self._ids.append(ids)
        self._lens.append(len(ids))
        self._buffered += len(ids)
        while self._buffered >= self.seq_len:
            yield self._emit(self.seq_len)

    def flush(self) -> Iterator[PackedRow]:
        if self._buffered:
            yield self._emit(self._buffered)

    def _emit(self, take: int) -> PackedRow:
        # A single buffered array (a long document's remainder) is sliced as a view, not copied.
        flat = self._ids[0] if len(self._ids) == 1 else np.concatenate(self._ids)
        row, rest = flat[:take], flat[take:]
        lens, used = [], 0
        for n in self._lens:
            if used + n <= take:
                lens.append(n)
                used += n
            else:
                if take - used:
                    lens.append(take - used)
                break
        remainder = self._buffered - take
        # The cut document continues in the next row as a fragment starting at position 0.
        self._ids = [rest] if remainder else []
        self._lens = [remainder] if remainder else []
        self._buffered = remainder
        return _finish(row, lens, None, self.seq_len, self.pad_id)


class ConversationPacker:
    """SFT packer: whole conversations only; a row is padded when the next one does not fit.

    With ``pack=False`` every conversation gets its own row.
    """

    def __init__(self, seq_len: int, pad_id: int, pack: bool):
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.pack = pack
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._buffered = 0

    def add(self, ids: np.ndarray, labels: np.ndarray) -> Iterator[PackedRow]:
        if len(ids) > self.seq_len:
            raise ValueError(f"conversation of {len(ids)} tokens exceeds seq_len {self.seq_len}")
        if self._buffered and (not self.pack or self._buffered + len(ids) > self.seq_len):
            yield self._emit()
        self._ids.append(np.asarray(ids, dtype=np.int32))
        self._labels.append(np.asarray(labels, dtype=np.int32))
        self._buffered += len(ids)

    def flush(self) -> Iterator[PackedRow]:
        if self._buffered:
            yield self._emit()

    def _emit(self) -> PackedRow:
        lens = [len(x) for x in self._ids]
        row = _finish(
            np.concatenate(self._ids), lens, np.concatenate(self._labels), self.seq_len, self.pad_id
        )
        self._ids, self._labels, self._buffered = [], [], 0
        return row


def _finish(
    ids: np.ndarray, lens: list[int], labels: np.ndarray | None, seq_len: int, pad_id: int
) -> PackedRow:
    real = len(ids)
    pad = seq_len - real
    if pad:
        ids = np.concatenate([ids, np.full(pad, pad_id, dtype=np.int32)])
        lens = [*lens, pad]
        if labels is not None:
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, dtype=np.int32)])
    return PackedRow(ids.astype(np.int32), segment_positions(lens), labels, real)
