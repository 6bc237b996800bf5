"""Training benchmark: `raylm train` (Ray Train + DeepSpeed) against bare PyTorch on the same work.

Interleaved in one script, on the same model, batches (``training.data.MixedRows``), seq_len,
AdamW settings and thread count per process (``torch.set_num_threads`` on both sides; Ray sets
OMP_NUM_THREADS=1 in workers and the launcher sets torch's threads to ``cpus_per_worker``):

- 1 worker: ``training.launcher.train`` with ZeRO-0 and with ZeRO-2 vs a single-process loop;
- 2 workers: ``train`` with ZeRO-0 vs ``torchrun --nproc_per_node 2`` DDP (gloo), same global batch;
  between them raylm's own per-worker loop under torchrun without Ray
  (``bench/train_loop_torchrun.py``), which splits the gap into the loop's share and Ray's;
- 2 workers under ZeRO-2 (the quickstart's setting) in bf16 vs fp32: the quickstart trains in bf16
  on a CPU with bf16 instructions (``cluster.quickstart.cpu_has_bf16``).

Throughput is steady state: the first ``--log-every`` steps are left out on both sides (raylm:
the first metrics row; its tokens_per_s is measured between rows). Start-up (Ray Train worker
group, DeepSpeed init, final eval and checkpoint for raylm; model build for the in-process
baseline; process launch, imports and model build for torchrun) is reported separately, as is
``ray.init``. Each repeat runs every variant once, in the same order;
ratios are medians over repeats. Never part of the test suite.

    python bench/train_throughput.py --repeat 3
    python bench/train_throughput.py --hidden 128 --repeat 5 --only "2 proc,2w"   # 2 workers only
    python bench/train_throughput.py --hidden 128 --micro-batch 8 --only "2w ZeRO-2"   # bf16 vs fp32
    python bench/train_throughput.py --hidden 128 --layers 2 --steps 15 --repeat 2   # short
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "train"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rows", type=int, default=16, help="rows per optimizer step (global)")
    p.add_argument("--micro-batch", type=int, default=4)
    # 30 steady steps: with 10, single runs swung +-10% and the ratios with them.
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--log-every", type=int, default=5, help="also the steps left out as warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", default="", help="comma-separated words: run the variants whose name "
                   "contains one (e.g. '2 proc,2w')")  # fmt: skip
    return p.parse_args()


def _model(a: argparse.Namespace) -> dict[str, Any]:
    return {"preset": "tiny", "hidden_size": a.hidden, "num_layers": a.layers,
            "num_heads": a.heads, "num_kv_heads": a.heads, "intermediate_size": 3 * a.hidden,
            "max_position_embeddings": max(512, a.seq_len)}  # fmt: skip


def _dataset(a: argparse.Namespace) -> Path:
    from training.synthetic import write_synthetic_dataset

    out = OUT / f"ds-{a.vocab}-{a.seq_len}-{a.rows * a.steps}"
    if not (out / "manifest.json").is_file():
        write_synthetic_dataset(out, train_rows=a.rows * a.steps, validation_rows=4 * a.micro_batch,
                                seq_len=a.seq_len, vocab_size=a.vocab)  # fmt: skip
    return out


def _raylm_sets(
    a: argparse.Namespace, ds: Path, name: str, workers: int, zero: int, precision: str = "fp32"
) -> list[str]:
    sets = [f"name={name}", f"train.datasets=[{ds}]", f"train.storage_path={OUT / 'runs'}",
            f"train.global_batch_tokens={a.rows * a.seq_len}",
            f"train.micro_batch_size={a.micro_batch}", f"train.max_steps={a.steps}",
            f"train.log_every={a.log_every}", "train.checkpoint_every=100000",
            "train.eval_batches=1", "train.warmup_steps=0", "train.lr=0.001",
            f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={a.threads}",
            f"deepspeed.zero_stage={zero}", f"deepspeed.precision={precision}",
            "train.progress=false"]  # fmt: skip
    return sets + [f"model.{k}={v}" for k, v in _model(a).items()]


def _raylm_cfg(
    a: argparse.Namespace, ds: Path, name: str, workers: int, zero: int, precision: str = "fp32"
):
    from cluster.config import load_config

    return load_config(None, _raylm_sets(a, ds, name, workers, zero, precision))


def _from_metrics(a: argparse.Namespace, run: Path, wall: float) -> dict:
    """Steady tokens/s from a run dir's metrics.jsonl (the first row is warm-up); start-up is the
    wall time outside the logged steps."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    marks = [0] + [r["step"] for r in rows]
    # Per row: the tokens of the steps since the previous row, and the seconds they took.
    tokens = [(marks[i + 1] - marks[i]) * a.rows * a.seq_len for i in range(len(rows))]
    seconds = [t / r["tokens_per_s"] for t, r in zip(tokens, rows, strict=True)]
    steady = sum(tokens[1:]) / sum(seconds[1:])
    return {"tokens_per_s": steady, "startup_s": wall - sum(seconds)}


def run_raylm(
    a: argparse.Namespace, ds: Path, workers: int, zero: int, tag: str, precision: str = "fp32"
) -> dict:
    from training.launcher import run_dir, train

    cfg = _raylm_cfg(a, ds, f"{tag}-w{workers}-z{zero}-{precision}", workers, zero, precision)
    shutil.rmtree(run_dir(cfg), ignore_errors=True)
    t0 = time.perf_counter()
    train(cfg)
    out = _from_metrics(a, run_dir(cfg), time.perf_counter() - t0)
    shutil.rmtree(run_dir(cfg), ignore_errors=True)
    return out


def _torchrun(workers: int, script: str, spec: dict, threads: int) -> str:
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", str(workers), "--master_port", "29533",
           str(ROOT / "bench" / script), json.dumps(spec)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]


def run_loop_torchrun(a: argparse.Namespace, ds: Path, workers: int, tag: str) -> dict:
    """raylm's per-worker loop (DeepSpeed ZeRO-0) under torchrun: raylm train without Ray."""
    name = f"{tag}-loop-w{workers}"
    spec = {"sets": _raylm_sets(a, ds, name, workers, 0), "threads": a.threads}
    run = OUT / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    _torchrun(workers, "train_loop_torchrun.py", spec, a.threads)
    out = _from_metrics(a, run, time.perf_counter() - t0)
    shutil.rmtree(run, ignore_errors=True)
    return out


def run_baseline(a: argparse.Namespace, ds: Path, workers: int) -> dict:
    from training.launcher import plan_job

    job = plan_job(_raylm_cfg(a, ds, "spec", workers, 0))
    spec = {"model": _model(a), "vocab": job.vocab_size, "pad_id": job.pad_id, "dataset": str(ds),
            "global_rows": a.rows, "micro_batch": a.micro_batch, "seq_len": a.seq_len,
            "steps": a.steps, "skip": a.log_every, "threads": a.threads, "lr": 0.001}  # fmt: skip
    if workers == 1:
        from bench.train_baseline import run

        return run(spec)
    t0 = time.perf_counter()
    result = json.loads(_torchrun(workers, "train_baseline.py", spec, a.threads))
    # Start-up as for raylm: everything but the steps, process launch and imports included.
    return {**result, "startup_s": time.perf_counter() - t0 - result["steps_s"]}


VARIANTS = [  # (name, what it is compared with)
    ("bare 1 proc", None),
    ("raylm 1w ZeRO-0", "bare 1 proc"),
    ("raylm 1w ZeRO-2", "bare 1 proc"),
    ("torchrun DDP 2 proc", None),
    ("loop torchrun 2 proc", "torchrun DDP 2 proc"),
    ("raylm 2w ZeRO-0", "torchrun DDP 2 proc"),
    # The quickstart's setting, and the bf16 it picks on a CPU with bf16 instructions.
    ("raylm 2w ZeRO-2", None),
    ("raylm 2w ZeRO-2 bf16", "raylm 2w ZeRO-2"),
]


def _selected(a: argparse.Namespace) -> list[tuple[str, str | None]]:
    words = [w.strip() for w in a.only.split(",") if w.strip()]
    return [v for v in VARIANTS if not words or any(w in v[0] for w in words)]


def _one_repeat(a: argparse.Namespace, ds: Path, r: int) -> dict[str, dict]:
    runs = {
        "bare 1 proc": lambda: run_baseline(a, ds, 1),
        "raylm 1w ZeRO-0": lambda: run_raylm(a, ds, 1, 0, f"r{r}"),
        "raylm 1w ZeRO-2": lambda: run_raylm(a, ds, 1, 2, f"r{r}"),
        "torchrun DDP 2 proc": lambda: run_baseline(a, ds, 2),
        "loop torchrun 2 proc": lambda: run_loop_torchrun(a, ds, 2, f"r{r}"),
        "raylm 2w ZeRO-0": lambda: run_raylm(a, ds, 2, 0, f"r{r}"),
        "raylm 2w ZeRO-2": lambda: run_raylm(a, ds, 2, 2, f"r{r}"),
        "raylm 2w ZeRO-2 bf16": lambda: run_raylm(a, ds, 2, 2, f"r{r}", "bf16"),
    }
    out = {}
    for name, _ in _selected(a):
        out[name] = runs[name]()
        print(f"repeat {r}: {name:22s} {out[name]['tokens_per_s']:10.0f} tok/s  "
              f"start-up {out[name]['startup_s']:5.1f} s", flush=True)  # fmt: skip
    return out


def main() -> None:
    a = _args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import ray

    ds = _dataset(a)
    t0 = time.perf_counter()
    # Ray starts its workers at nice 15; the baselines run at 0. Equal footing for the comparison.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=max(4, 2 * a.threads * 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})  # fmt: skip
    print(f"ray.init {time.perf_counter() - t0:.1f} s; load avg {os.getloadavg()[0]:.1f}")
    results = [_one_repeat(a, ds, r) for r in range(a.repeat)]
    print(f"\nmodel {_model(a)}, seq {a.seq_len}, {a.rows} rows/step, micro-batch {a.micro_batch}, "
          f"{a.threads} thread(s)/process, {a.steps} steps ({a.log_every} warm-up), "
          f"{a.repeat} repeats; load avg {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'variant':22s} {'median tok/s':>12s} {'ratio (median)':>15s} {'start-up':>9s}")
    for name, ref in _selected(a):
        ref = ref if ref in results[0] else None
        tps = statistics.median(r[name]["tokens_per_s"] for r in results)
        ratio = "" if ref is None else (
            f"{statistics.median(r[name]['tokens_per_s'] / r[ref]['tokens_per_s'] for r in results):.3f}x"
        )  # fmt: skip
        start = statistics.median(r[name]["startup_s"] for r in results)
        print(f"{name:22s} {tps:12.0f} {ratio:>15s} {start:8.1f}s")
    ray.shutdown()


if __name__ == "__main__":
    main()
