"""raylm's per-worker loop on N local processes (torch.multiprocessing + gloo), without Ray.

For the numerics tests (ZeRO stage equivalence, SFT loss splits): the loop takes its rank, world
size and reporting as arguments (``training.loop.WorkerIO``), so the same ``run_worker`` that Ray
Train runs also runs here, at a fraction of a Ray Train run's start-up: the ranks are forked from
one fork server per test process, which has imported torch, DeepSpeed, transformers' Llama and the
loop (a rank starts in well under a second instead of ~4 s of imports). Checkpoints are written as
``raylm train`` writes them on a local storage path: every rank's files in place in
``run_dir/<checkpoint name>``, so ``raylm export`` reads them, and a run dir that has checkpoints
resumes from the newest that verifies. What only Ray does (restarts, SIGTERM, S3, placement) stays
tested through ``raylm train``.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any

from training.loop import WorkerHooks, WorkerIO, WorkerJob

__all__ = ["run_loop", "run_loops"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StoreCheckpoints:
    """The loop's reporter: metrics are already in metrics.jsonl and checkpoints were written in
    place; it only checks that they were."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)

    def __call__(
        self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int, dir_name=None
    ) -> None:
        if checkpoint_dir is not None and checkpoint_dir != self.run_dir / str(dir_name):
            raise AssertionError(f"checkpoint {checkpoint_dir} not written in place as {dir_name}")


def _worker(
    jobs: list[WorkerJob], rank: int, world: int, port: int, hooks: WorkerHooks | None
) -> None:
    import torch

    from training.checkpoint import checkpoint_dirs
    from training.loop import run_worker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      TOKENIZERS_PARALLELISM="false")  # fmt: skip
    torch.set_num_threads(1)  # the ranks share the cores, as Ray's workers do
    hooks = hooks or WorkerHooks()
    for job in jobs:  # one after another in the same processes and process group
        # A run dir with checkpoints resumes from them, newest first, as `raylm train` does.
        io = WorkerIO(rank=rank, world_size=world, report=_StoreCheckpoints(job.run_dir),
                      resume_candidates=functools.partial(checkpoint_dirs, job.run_dir),
                      after_step=hooks.after_step, before_update=hooks.before_update,
                      checkpoint_root=Path(job.run_dir))  # fmt: skip
        run_worker(job, io)


# What every rank imports before its first step (~4 s of CPU per process on 2 cores), imported once
# by the fork server, whose forks start with them loaded. Imports only: no torch op runs in the
# server, so no intra-op thread pool exists for a fork to copy; each rank sets its own threads.
PRELOAD = [
    "torch",
    "torch.distributed",
    "deepspeed",
    "transformers.models.llama.modeling_llama",
    "training.loop",
]


@functools.cache
def _context():
    """A fork-server context (one server per test process, started on first use) with PRELOAD."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_loop(
    job: WorkerJob, world: int, hooks: WorkerHooks | None = None, timeout_s: float = 300
) -> Path:
    """Train ``job`` on ``world`` forked processes; returns its run dir. Raises if a rank fails."""
    run_loops([job], world, hooks, timeout_s)
    return Path(job.run_dir)


def run_loops(
    jobs: list[WorkerJob], world: int, hooks: WorkerHooks | None = None, timeout_s: float = 300
) -> None:
    """Train ``jobs`` one after another on the same ``world`` processes (the process group is set
    up once). Raises if a rank fails."""
    for job in jobs:
        Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    ctx = _context()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(jobs, rank, world, port, hooks))
             for rank in range(world)]  # fmt: skip
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    codes = [p.exitcode for p in procs]
    if any(codes):
        raise RuntimeError(f"run_loops({[j.run_dir for j in jobs]}): rank exit codes {codes}")
