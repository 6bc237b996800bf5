"""Deterministic row assignment to ranks (pure functions, no Ray)."""

from __future__ import annotations

import dataclasses
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


def _add_labels(root: Path) -> None:
    """Turn a synthetic pretraining dataset into an SFT-style one: labels -100 on each row's
    first half (the 'prompt'), input_ids elsewhere."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in sorted(root.glob("*/*.parquet")):
        table = pq.read_table(f)
        labels = []
        for ids in table["input_ids"].to_pylist():
            half = len(ids) // 2
            labels.append([-100] * half + ids[half:])
        pq.write_table(table.append_column("labels", pa.array(labels, pa.list_(pa.int32()))), f)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["mode"] = "sft"
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_pretraining_rows_mixed_into_sft_carry_loss_on_every_token(tmp_path) -> None:
    """SFT mixed with a pretraining dataset (to keep the base model's language ability): every
    micro-batch carries labels; the SFT rows keep their -100 prompt labels, the pretraining rows'
    labels are their input_ids; validation batches too."""
    from training.data import MixedRows, dataset_info, validation_batches
    from training.synthetic import write_synthetic_dataset

    pre = write_synthetic_dataset(tmp_path / "pre", train_rows=32, seq_len=16, seed=1)
    sft = write_synthetic_dataset(tmp_path / "sft", train_rows=32, seq_len=16, seed=2)
    _add_labels(sft)
    infos = [dataset_info(str(sft)), dataset_info(str(pre))]
    assert [i.has_labels for i in infos] == [True, False]
    kinds = Counter()
    for mbs in MixedRows(infos, [1.0, 1.0], 0, 8, 4, 1, 0).iter_steps(0, 6):
        for mb in mbs:
            assert set(mb) == {"row_id", "input_ids", "position_ids", "labels"}
            for ids, labels in zip(mb["input_ids"], mb["labels"], strict=True):
                half = len(ids) // 2
                if (labels[:half] == -100).all():
                    kinds["sft"] += 1
                    np.testing.assert_array_equal(labels[half:], ids[half:])
                else:
                    kinds["pretrain"] += 1
                    np.testing.assert_array_equal(labels, ids)
    assert kinds["sft"] > 0 and kinds["pretrain"] > 0, kinds
    val = validation_batches(infos, 2, 1, 0, 8)
    assert val and all("labels" in mb for mb in val)


def test_datasets_from_different_tokenizers_are_refused(tmp_path) -> None:
    import json

    from cluster.config import load_config
    from training.errors import TrainConfigError
    from training.launcher import plan_job
    from training.synthetic import write_synthetic_dataset

    a = write_synthetic_dataset(tmp_path / "a", train_rows=16, seq_len=16)
    b = write_synthetic_dataset(tmp_path / "b", train_rows=16, seq_len=16)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "another"
    (b / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, [f"train.datasets=[{a},{b}]", f"train.storage_path={tmp_path}",
                             "train.global_batch_tokens=64", "model.preset=tiny"])  # fmt: skip
    with pytest.raises(TrainConfigError, match=r"train\.datasets\[1\]\.path: .*another tokenizer"):
        plan_job(cfg)


@pytest.mark.parametrize(
    ("task", "mode"),
    [("pretrain", "sft"), ("sft", "preference"), ("pretrain", "preference"), ("dpo", "sft"),
     ("dpo", "pretrain")],
)  # fmt: skip
def test_a_dataset_whose_mode_does_not_fit_the_task_is_refused(tmp_path, task, mode) -> None:
    import json

    from cluster.config import load_config
    from training.errors import TrainConfigError
    from training.launcher import plan_job
    from training.synthetic import write_synthetic_dataset

    ds = write_synthetic_dataset(tmp_path / "ds", train_rows=16, seq_len=16)
    manifest = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**manifest, "mode": mode}))
    cfg = load_config(None, [f"train.datasets=[{ds}]", f"train.storage_path={tmp_path}",
                             "train.global_batch_tokens=64", f"train.task={task}"])  # fmt: skip
    match = rf"train\.datasets\[0\]\.path: .* data\.mode {mode}, which train\.task {task} cannot"
    with pytest.raises(TrainConfigError, match=match):
        plan_job(cfg)


def test_layout_index_and_arrow_copies_read_the_same_rows_as_the_row_id_index(tmp_path) -> None:
    """A `data prepare`-style output read through its memory-mapped Arrow copies, or through its
    manifest layout and parquet row groups (nothing read up front either way), gives the rows the
    row_id-column index gives, for training steps and validation."""
    import json

    from data_pipelines.pack import PackedRow
    from data_pipelines.writer import ShardWriter
    from training.data import MixedRows, dataset_info, validation_batches

    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 300), ("validation", 40)):
        w = ShardWriter(tmp_path / "ds" / split, rows_per_file=70, with_labels=False,
                        arrow_copy=True)  # fmt: skip
        for _ in range(n):
            ids = rng.integers(0, 1000, 2048, dtype=np.int32)
            w.add(PackedRow(ids, np.arange(2048, dtype=np.int32), None, 2048))
        w.close()
        assert all(g < r for r, g in w.layout[:-1])  # several row groups per file
        assert len(w.arrays) == len(w.files) and set(w.checksums) == {*w.files, *w.arrays}
        splits[split] = {"rows": w.rows, "files": w.files, "layout": w.layout, "arrays": w.arrays}
    manifest = {"mode": "pretrain", "seq_len": 2048, "splits": splits, "tokenizer": {}}
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    mapped = dataset_info(str(tmp_path / "ds"))
    assert mapped.layouts["train"] == splits["train"]["layout"]
    assert [Path(p).name for p in mapped.arrays["train"]] == splits["train"]["arrays"]
    with_layout = dataclasses.replace(mapped, arrays={})
    without = dataclasses.replace(with_layout, layouts={})
    readers = (mapped, with_layout, without)
    assert MixedRows([mapped], [1.0], 3, 16, 4, 2, 1).readers[0].arrays
    runs = [list(MixedRows([i], [1.0], 3, 16, 4, 2, 1).iter_steps(0, 9)) for i in readers]
    for steps in zip(*runs, strict=True):
        for mbs in zip(*steps, strict=True):
            for c in mbs[0]:
                for other in mbs[1:]:
                    np.testing.assert_array_equal(mbs[0][c], other[c])
    vals = [validation_batches([i], 4, 2, 1, 3) for i in readers]
    assert [len(v) for v in vals] == [3, 3, 3]
    for mbs in zip(*vals, strict=True):
        for other in mbs[1:]:
            np.testing.assert_array_equal(mbs[0]["row_id"], other["row_id"])
            np.testing.assert_array_equal(mbs[0]["input_ids"], other["input_ids"])


def test_ragged_preference_rows_read_alike_from_arrow_copies_and_parquet(tmp_path, caplog) -> None:
    """Pairs of any length come back as the same int32 arrays from the Arrow copies as from the
    parquet; a damaged copy is an error naming it; a dataset whose listed copies are gone is read
    from its parquet, with a warning naming it."""
    from data_pipelines.pack import PairRow
    from data_pipelines.writer import PREFERENCE_COLUMNS, ShardWriter
    from training.data import _SplitReader
    from training.errors import TrainConfigError

    rng = np.random.default_rng(1)
    w = ShardWriter(tmp_path / "train", rows_per_file=30, with_labels=False,
                    columns=PREFERENCE_COLUMNS, arrow_copy=True)  # fmt: skip
    for _ in range(100):
        a, b = rng.integers(1, 40, 2)
        w.add(PairRow(*(rng.integers(0, 99, n, dtype=np.int32) for n in (a, a, b, b))))
    w.close()
    files = [str(tmp_path / "train" / n) for n in w.files]
    arrays = [str(tmp_path / "train" / n) for n in w.arrays]
    columns = ["row_id", *PREFERENCE_COLUMNS]
    mapped = _SplitReader(files, columns, w.layout, arrays=arrays)
    parquet = _SplitReader(files, columns, w.layout)
    positions = rng.permutation(100)[:37]
    got, want = mapped.read(positions), parquet.read(positions)
    np.testing.assert_array_equal(got["row_id"], positions)
    for c in PREFERENCE_COLUMNS:
        assert len(got[c]) == len(want[c]) == 37
        for x, y in zip(got[c], want[c], strict=True):
            assert x.dtype == np.int32
            np.testing.assert_array_equal(x, y)
    # A copy whose row ids are not int64 (read from its buffers, they would be misread)
    import pyarrow as pa

    table = pa.ipc.open_file(arrays[0]).read_all()
    table = table.set_column(0, "row_id", table["row_id"].cast(pa.int32()))
    with pa.OSFile(arrays[0], "wb") as sink, pa.ipc.new_file(sink, table.schema) as ipc:
        ipc.write_table(table)
    with pytest.raises(TrainConfigError, match=r"part-00000\.arrow: column row_id is not as data"):
        _SplitReader(files, columns, w.layout, arrays=arrays).read(np.arange(0, 10))
    Path(arrays[2]).write_bytes(b"not arrow")  # a damaged copy: an error naming it
    with pytest.raises(TrainConfigError, match=r"part-00002\.arrow: not an Arrow copy as data"):
        _SplitReader(files, columns, w.layout, arrays=arrays).read(np.arange(60, 70))
    Path(arrays[1]).unlink()
    with caplog.at_level("WARNING", logger="training.data"):
        fallback = _SplitReader(files, columns, w.layout, arrays=arrays)
    assert (
        fallback.arrays is None and "Arrow copies listed in the manifest are missing" in caplog.text
    )
    np.testing.assert_array_equal(
        fallback.read(positions)["chosen_input_ids"][3], want["chosen_input_ids"][3]
    )
