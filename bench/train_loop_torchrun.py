"""raylm's per-worker loop (``training.loop.run_worker``: DeepSpeed, raylm's step, metrics) under
``torchrun --nproc_per_node N bench/train_loop_torchrun.py SPEC_JSON``, without Ray.

``bench/train_throughput.py`` runs it between torchrun DDP and ``raylm train``: it splits what a
``raylm train`` run costs against DDP into the loop's share (this against DDP) and Ray's share
(``raylm train`` against this). SPEC_JSON: ``{"sets": [KEY=VALUE, ...], "threads": N}``, the same
overrides ``bench/train_throughput.py`` gives ``raylm train``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cluster.config import load_config  # noqa: E402
from training.launcher import plan_job  # noqa: E402
from training.loop import WorkerIO, run_worker  # noqa: E402


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    job = plan_job(load_config(None, spec["sets"]))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run_worker(job, WorkerIO(rank=rank, world_size=world, report=lambda *args: None))
    if rank == 0:  # tokens/s come from the run dir's metrics.jsonl, as for raylm train
        print("RESULT " + json.dumps({"run_dir": job.run_dir}))


if __name__ == "__main__":
    main()
