"""Test-side worker hooks, handed to ``training.launcher.train(cfg, hooks=WorkerHooks(...))``.

They travel to the Ray Train workers inside ``train_loop_config`` (cloudpickle), so nothing in the
shipped package reads a test switch from the environment. Plain classes with their state in
fields: they pickle by value of their fields and by reference to this module, which the workers
import from the repo (the driver's working directory is on their ``sys.path``).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KILLED_NAME = ".test_killed"  # written into the run dir with the step, just before the signal


@dataclass
class KillAt:
    """After optimizer step ``step``, rank ``rank`` sends itself ``signum`` (once per run dir)."""

    run_dir: str
    step: int
    rank: int
    signum: int = signal.SIGKILL

    def __call__(self, step: int, rank: int) -> None:
        marker = Path(self.run_dir) / KILLED_NAME
        if step == self.step and rank == self.rank and not marker.exists():
            marker.write_text(str(step))
            os.kill(os.getpid(), self.signum)
            if self.signum == signal.SIGTERM:
                _wait_until_seen()


def _wait_until_seen(timeout_s: float = 30.0) -> None:
    """Until the worker's SIGTERM handling has the signal. The kernel hands a signal sent to the
    process to its main thread, whose C-level handler writes the wakeup byte only once that thread
    is scheduled: on 2 busy cores the loop's own thread could reach the step's flags first, and the
    test would see the stop one step later than the step it means."""
    from training.preempt import _sigterm_seen

    deadline = time.monotonic() + timeout_s
    while not _sigterm_seen() and time.monotonic() < deadline:
        time.sleep(0.001)


@dataclass
class SaveGrads:
    """Rank 0 saves the reduced gradients of step ``step`` (ZeRO-0) to ``out``/step{N}.safetensors."""

    out: str
    step: int = 1

    def __call__(self, module: Any, step: int, rank: int) -> None:
        if step != self.step or rank != 0:
            return
        from safetensors.torch import save_file

        grads = {n: p.grad.detach().float().clone() for n, p in module.named_parameters()
                 if p.grad is not None}  # fmt: skip
        Path(self.out).mkdir(parents=True, exist_ok=True)
        save_file(grads, str(Path(self.out) / f"step{step}.safetensors"))
