"""Exact dedup across all shards with hash-partitioned actors.

Each actor owns the documents whose 16-byte content hash falls in its partition and holds one 8-byte
integer per kept document: that set is the only state in the pipeline that grows with the corpus.
``data prepare`` asks them from its ordered consumer, batch by batch in (shard, line) order, so the
first copy of a document in that order is the one kept, whatever the actor count or timing.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DedupShard", "mark_duplicates", "partition_of"]


def partition_of(digest: bytes, partitions: int) -> int:
    return int.from_bytes(digest[:8], "big") % partitions


class DedupShard:
    """Plain class, turned into a Ray actor by the pipeline (``ray.remote(DedupShard)``)."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def first_seen(self, keys: list[int]) -> list[bool]:
        """For each key: True if no earlier call (or earlier key in this list) registered it."""
        out = []
        for k in keys:
            new = k not in self._seen
            if new:
                self._seen.add(k)
            out.append(new)
        return out

    def size(self) -> int:
        return len(self._seen)


def mark_duplicates(batch: dict[str, np.ndarray], shards: list) -> dict[str, np.ndarray]:
    """Ray Data batch function: set ``reason`` to ``duplicate`` for documents seen before."""
    import ray

    reasons = batch["reason"].copy()
    parts: dict[int, list[int]] = {}
    keys: dict[int, list[int]] = {}
    for i, (reason, digest) in enumerate(zip(reasons, batch["hash"], strict=True)):
        if reason:
            continue
        p = partition_of(digest, len(shards))
        parts.setdefault(p, []).append(i)
        # The second 8 bytes as the stored key: independent of the partition choice.
        keys.setdefault(p, []).append(int.from_bytes(digest[8:16], "big"))
    order = sorted(parts)
    results = ray.get([shards[p].first_seen.remote(keys[p]) for p in order])
    for p, flags in zip(order, results, strict=True):
        for i, new in zip(parts[p], flags, strict=True):
            if not new:
                reasons[i] = "duplicate"
    return {**batch, "reason": reasons}
