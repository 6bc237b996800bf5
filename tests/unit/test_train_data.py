"""Deterministic row assignment to ranks (pure functions, no Ray)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from training.data import epoch_order, rank_row_order, shard_epoch


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("total", [97, 128, 1001])
def test_equal_steps_no_repeats_tail_counted(world: int, total: int) -> None:
    global_rows = 12
    shards = [rank_row_order(0, 7, total, world, r, global_rows) for r in range(world)]
    steps = {s.steps for s in shards}
    assert steps == {total // global_rows}
    seen = np.concatenate([s.rows.ravel() for s in shards])
    assert len(np.unique(seen)) == len(seen)  # nothing repeated within an epoch
    assert shards[0].dropped == total - len(seen)
    assert all(s.rows.shape == (total // global_rows, global_rows // world) for s in shards)


def test_deterministic_and_reshuffled_per_epoch() -> None:
    a = rank_row_order(0, 3, 200, 2, 1, 8).rows
    assert np.array_equal(a, rank_row_order(0, 3, 200, 2, 1, 8).rows)
    assert not np.array_equal(a, rank_row_order(1, 3, 200, 2, 1, 8).rows)
    assert not np.array_equal(a, rank_row_order(0, 4, 200, 2, 1, 8).rows)


def test_step_rows_do_not_depend_on_world_size() -> None:
    one = rank_row_order(0, 0, 100, 1, 0, 8).rows  # (steps, 8)
    two = np.concatenate([rank_row_order(0, 0, 100, 2, r, 8).rows for r in range(2)], axis=1)
    assert np.array_equal(one, two)


def test_mixing_weights_and_no_repeat_before_full_pass() -> None:
    sizes, weights = [100, 300], [3.0, 1.0]
    counts = Counter()
    seen0: list[int] = []
    for epoch in range(3):
        order = epoch_order(epoch, 0, sizes, weights)
        assert len(order) == 400
        counts.update(order[:, 0].tolist())
        seen0 += order[order[:, 0] == 0, 1].tolist()
    assert counts[0] == 3 * 300 and counts[1] == 3 * 100
    # Dataset 0 is upsampled 3x: every row exactly 3 times per epoch (3 full permutations).
    for k in range(3):
        assert set(Counter(seen0[k * 300 : (k + 1) * 300]).values()) == {3}
    # Dataset 1 (subsampled) sees 300 distinct rows over 3 epochs before repeating.
    ones = np.concatenate([epoch_order(e, 0, sizes, weights) for e in range(3)])
    assert len(np.unique(ones[ones[:, 0] == 1, 1])) == 300


def test_shard_epoch_rejects_uneven_split() -> None:
    with pytest.raises(ValueError, match="does not split"):
        shard_epoch(np.zeros((10, 2), dtype=np.int64), 5, 2, 0)


def test_relative_dataset_paths_reach_workers_absolute(tmp_path, monkeypatch):
    """Ray Train workers run in another working directory: the plan must carry absolute paths."""
    from training.data import dataset_info
    from training.synthetic import write_synthetic_dataset

    monkeypatch.chdir(tmp_path)
    write_synthetic_dataset(tmp_path / "rel" / "data", train_rows=16, seq_len=16)
    info = dataset_info("rel/data")
    assert Path(info.path).is_absolute()
    assert all(Path(f).is_absolute() for split in info.files.values() for f in split)
