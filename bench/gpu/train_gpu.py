"""One-GPU training benchmark: raylm's per-worker loop (``training.loop.run_worker``) in a single
process, without Ray: DeepSpeed ZeRO-2, bf16, torch AdamW, sdpa attention, a ~1B Llama-style model
(preset ``1b``: Llama-3.2-1B shape) at seq_len 2048 on synthetic packed rows.

Prints steady-state tokens/s and MFU against the bf16 matmul peak measured in the same process
(an 8192^3 product), so the ratio does not depend on a datasheet number. The loop's own metrics
rows give tokens/s between rows; the first row (compilation, allocator warm-up) is left out.
Start-up (model build and init, ``deepspeed.initialize``) and the end (eval, checkpoint) are
reported separately.

    bash bench/gpu/run.sh                 # on the GPU machine (installs missing wheels first)
    bash bench/gpu/run.sh --cpu-smoke     # anywhere: tiny model, fp32, gloo, a few steps

Needs: torch, numpy, transformers, tokenizers, safetensors, pyarrow (the data reader), pydantic and
deepspeed (+ hjson, ...); ``bench/gpu/build_wheels.sh`` fetches those a torch-only image lacks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, fp32, CPU/gloo, 4 steps")
    p.add_argument("--preset", default="1b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5, help="the first row is left out")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--out", default="", help="work dir (default: a temp dir)")
    p.add_argument("--json", default="", help="also write the summary here")
    a = p.parse_args()
    if a.cpu_smoke:
        a.preset, a.seq_len, a.micro_batch, a.accum = "tiny", 128, 2, 2
        a.steps, a.log_every, a.vocab = 4, 2, 256
    return a


def matmul_peak_tflops(device: str, dtype: Any, n: int, iters: int = 10) -> float:
    """Dense matmul throughput of this device, TFLOP/s (2 n^3 per product; 3 warm-ups)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def _job(a: argparse.Namespace, work: Path, peak: float, gpu: bool) -> Any:
    from training.config import DeepSpeedConfig, ModelConfig, TrainConfig
    from training.data import dataset_info
    from training.loop import WorkerJob
    from training.synthetic import write_synthetic_dataset

    rows = a.micro_batch * a.accum
    ds = write_synthetic_dataset(work / "ds", train_rows=rows * a.steps, validation_rows=a.micro_batch,
                                 seq_len=a.seq_len, vocab_size=a.vocab)  # fmt: skip
    train = TrainConfig(global_batch_tokens=rows * a.seq_len, micro_batch_size=a.micro_batch,
                        max_steps=a.steps, log_every=a.log_every, checkpoint_every=10**9,
                        eval_batches=1, warmup_steps=2, lr=3e-4, peak_tflops=peak)  # fmt: skip
    ds_conf = DeepSpeedConfig(zero_stage=a.zero, precision="fp32" if a.cpu_smoke else "bf16")
    model = ModelConfig(preset=a.preset, attn_implementation="sdpa",
                        max_position_embeddings=max(a.seq_len, 128))  # fmt: skip
    return WorkerJob(model=model, train=train, deepspeed=ds_conf, seed=0, run_dir=str(work / "run"),
                     datasets=[dataset_info(str(ds))], weights=[1.0], seq_len=a.seq_len,
                     vocab_size=a.vocab, pad_id=0, total_steps=a.steps, config_hash="bench",
                     use_gpu=gpu)  # fmt: skip


def _summary(rows: list[dict], a: argparse.Namespace, peak: float, wall: float) -> dict:
    steady = rows[1:] or rows
    tokens = a.micro_batch * a.accum * a.seq_len * a.log_every  # per row
    seconds = [tokens / r["tokens_per_s"] for r in rows]
    tps = tokens * len(steady) / sum(tokens / r["tokens_per_s"] for r in steady)
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {"tokens_per_s": tps, "mfu": statistics.median(mfus) if mfus else None,
            "peak_tflops": peak, "final_loss": rows[-1]["loss"], "wall_s": wall,
            "outside_steps_s": wall - sum(seconds)}  # fmt: skip


def main() -> None:
    a = _args()
    import torch

    from training.loop import WorkerIO, run_worker

    gpu = torch.cuda.is_available() and not a.cpu_smoke
    if not gpu and not a.cpu_smoke:
        sys.exit("train_gpu.py: no CUDA device; use --cpu-smoke to check the code path")
    dtype = torch.bfloat16 if gpu else torch.float32
    peak = matmul_peak_tflops("cuda" if gpu else "cpu", dtype, 8192 if gpu else 512)
    print(f"matmul peak ({'bf16 cuda' if gpu else 'fp32 cpu'}): {peak:.4g} TFLOP/s", flush=True)
    work = Path(a.out or tempfile.mkdtemp(prefix="raylm_gpu_bench_"))
    job = _job(a, work, peak, gpu)
    t0 = time.perf_counter()
    run_worker(job, WorkerIO(rank=0, world_size=1, report=lambda *args: None))
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        print(json.dumps({k: r.get(k) for k in ("step", "loss", "tokens_per_s", "mfu")}))
    out = {"device": torch.cuda.get_device_name() if gpu else "cpu", "preset": a.preset,
           "seq_len": a.seq_len, "rows_per_step": a.micro_batch * a.accum, "zero": a.zero,
           "torch": torch.__version__, **_summary(rows, a, peak, wall)}  # fmt: skip
    print("RESULT " + json.dumps(out), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
