"""Training reads: one rank's memory and speed on a prepared dataset of N and of 8N rows.

raylm's reader (``training.data.MixedRows``: a row_id index, the step's rows read with ``pread``
from the Arrow copies, a prefetch thread), the same reader without the Arrow copies
(``raylm-parquet``: the step's parquet row groups decoded) and the previous reader (kept here as
``WholeEpochRows``: the rank's whole epoch loaded before step 1), side by side in this script, each
side in its own fresh process (peak RSS is the process's own), alternating sides and sizes so all
see the same background load.

The datasets are written by raylm's writer (``data_pipelines.writer.ShardWriter``: the row groups
and Arrow copies `data prepare` writes), random tokens, the same seq_len for both sizes; the rank
is rank 0 of 8 and reads the same number of steps from both sizes. Printed per (reader, size): time
to the first step (index build and, for the old reader, the epoch load), steady rows/s over the
following steps, peak RSS; then the ratios the issue asks for.

    python bench/data_read.py                      # N = 16k rows of 512 tokens (~64 MB of tokens)
    python bench/data_read.py --rows 4000 --steps 50 --repeat 1   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORLD, GLOBAL_ROWS, MICRO = 8, 64, 4  # 8 rows per rank per step, 2 micro-batches


def write_dataset(out: Path, rows: int, seq_len: int, seed: int = 0) -> Path:
    """A prepared-dataset dir (train split only) of ``rows`` random rows, via raylm's writer."""
    from data_pipelines.pack import PackedRow
    from data_pipelines.writer import ShardWriter

    done = out / "manifest.json"
    if done.is_file() and json.loads(done.read_text())["splits"]["train"].get("arrays"):
        return out  # one written before the Arrow copies is written again
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out / "train", rows_per_file=2048, with_labels=False, arrow_copy=True)
    pos = np.arange(seq_len, dtype=np.int32)
    for _ in range(rows):
        ids = rng.integers(3, 32000, seq_len, dtype=np.int32)
        writer.add(PackedRow(input_ids=ids, position_ids=pos, labels=None, real_tokens=seq_len))
    writer.close()
    manifest = {"mode": "pretrain", "seq_len": seq_len, "pad_token_id": 0,
                "splits": {"train": {"rows": writer.rows, "files": writer.files,
                                     "layout": writer.layout, "arrays": writer.arrays},
                           "validation": {"rows": 0, "files": []}},
                "tokenizer": {"path": "", "fingerprint": "bench"}}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


class WholeEpochRows:
    """The previous reader: the rank's rows of the whole epoch read into memory before step 1
    (every file read in full), then sliced per step."""

    def __init__(self, info, seed: int, global_rows: int, micro: int, world: int, rank: int):
        import pyarrow.parquet as pq

        from training.data import epoch_order, shard_epoch

        self.files = info.files["train"]
        self.ids = [pq.read_table(f, columns=["row_id"])["row_id"].to_numpy() for f in self.files]
        self.size = sum(len(i) for i in self.ids)
        order = epoch_order(0, seed, [self.size], [1.0])
        self.shard = shard_epoch(order, global_rows, world, rank).rows[..., 1]
        self.micro = micro
        self.rows = self._read(self.shard.reshape(-1))

    def _read(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        out = {}
        sorted_ids = np.sort(np.concatenate(self.ids))
        wanted = sorted_ids[positions]
        for f, ids in zip(self.files, self.ids, strict=True):
            hit = np.isin(wanted, ids)
            if not hit.any():
                continue
            table = pq.read_table(f, columns=["row_id", "input_ids", "position_ids"])
            local = {int(r): i for i, r in enumerate(ids)}
            part = table.take(np.array([local[int(r)] for r in wanted[hit]]))
            for c in ("input_ids", "position_ids"):
                arr = np.stack(part[c].to_numpy(zero_copy_only=False))
                out.setdefault(c, np.zeros((len(wanted),) + arr.shape[1:], np.int32))[hit] = arr
        return out

    def iter_steps(self, start: int, end: int):
        per = self.shard.shape[1]
        for s in range(start, end):
            lo = s * per
            yield [{c: a[lo + m : lo + m + self.micro] for c, a in self.rows.items()}
                   for m in range(0, per, self.micro)]  # fmt: skip


def child(impl: str, dataset: str, steps: int) -> dict:
    """One side in this process: time to first step, steady rows/s, peak RSS (MiB)."""
    from training.data import MixedRows, dataset_info

    t0 = time.perf_counter()
    info = dataset_info(dataset)
    if impl.startswith("raylm"):
        if impl == "raylm-parquet":
            info = dataclasses.replace(info, arrays={})
        data = MixedRows([info], [1.0], 0, GLOBAL_ROWS, MICRO, WORLD, 0)
    else:
        data = WholeEpochRows(info, 0, GLOBAL_ROWS, MICRO, WORLD, 0)
    it = data.iter_steps(0, steps + 1)
    checksum = int(next(it)[0]["input_ids"][0, :4].sum())
    first = time.perf_counter() - t0
    t1, rows = time.perf_counter(), 0
    for mbs in it:
        rows += sum(len(mb["input_ids"]) for mb in mbs)
        checksum += int(mbs[0]["input_ids"][0, 0])
    steady = rows / (time.perf_counter() - t1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"first_step_s": first, "rows_per_s": steady, "peak_rss_mib": peak, "check": checksum}


def run_side(impl: str, dataset: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", impl, str(dataset), str(steps)],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=16_000, help="N: rows of the smaller dataset")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100, help="steps read after the first")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "bench" / "data_read"))
    ap.add_argument(
        "--child", nargs=3, metavar=("IMPL", "DATASET", "STEPS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.child:
        impl, dataset, steps = args.child
        print(json.dumps(child(impl, dataset, int(steps))))
        return
    if args.steps + 1 > args.rows // GLOBAL_ROWS:
        ap.error(f"--steps: an epoch of N rows has {args.rows // GLOBAL_ROWS} steps")
    work = Path(args.workdir)
    sizes = {"N": args.rows, "8N": 8 * args.rows}
    data = {k: write_dataset(work / f"{k}_{n}_{args.seq_len}", n, args.seq_len)
            for k, n in sizes.items()}  # fmt: skip
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeat):
        for impl in ("raylm", "raylm-parquet", "whole-epoch"):
            for size in sizes:
                r = run_side(impl, data[size], args.steps)
                results.setdefault((impl, size), []).append(r)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0] if m != "check"}
           for k, v in results.items()}  # fmt: skip
    print(f"one rank of {WORLD}, {GLOBAL_ROWS // WORLD} rows/step, seq_len {args.seq_len}, "
          f"N = {args.rows} rows, {args.steps} steps after the first, median of {args.repeat}")  # fmt: skip
    print(f"{'reader':14} {'size':4} {'first step s':>12} {'rows/s':>10} {'peak RSS MiB':>13}")
    for (impl, size), m in med.items():
        print(f"{impl:14} {size:4} {m['first_step_s']:12.2f} {m['rows_per_s']:10.0f} "
              f"{m['peak_rss_mib']:13.0f}")  # fmt: skip
    new, old = ("raylm", "N"), ("whole-epoch", "N")
    big = ("raylm", "8N")
    print(f"raylm 8N/N: peak RSS {med[big]['peak_rss_mib'] / med[new]['peak_rss_mib']:.2f}x "
          f"(aim <= 1.1), first step {med[big]['first_step_s'] / med[new]['first_step_s']:.2f}x "
          f"(aim <= 1.2)")  # fmt: skip
    print(f"steady rows/s raylm / whole-epoch: N {med[new]['rows_per_s'] / med[old]['rows_per_s']:.2f}x, "
          f"8N {med[big]['rows_per_s'] / med[('whole-epoch', '8N')]['rows_per_s']:.2f}x (aim >= 1)")  # fmt: skip
    old_big = med[("whole-epoch", "8N")]["peak_rss_mib"] / med[old]["peak_rss_mib"]
    print(f"whole-epoch 8N/N peak RSS: {old_big:.2f}x")


if __name__ == "__main__":
    main()
