"""Two live runs cannot write one run dir: the second fails at once, naming the dir and the holder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray

from cluster.config import load_config
from training.errors import RunLockedError
from training.launcher import run_dir, train
from training.runlock import LOCK_NAME, run_lock
from training.synthetic import write_synthetic_dataset

SEQ = 32


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the run's lock (as a live `raylm train` driver does)."""
    code = textwrap.dedent(f"""
        import sys, time
        from training.runlock import run_lock
        with run_lock({str(path)!r}):
            print("held", flush=True)
            time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.timeout(120)
def test_second_run_with_the_same_name_fails_before_any_worker(tmp_path) -> None:
    ds = write_synthetic_dataset(tmp_path / "ds", train_rows=32, validation_rows=8, seq_len=SEQ)
    cfg = load_config(None, ["name=locked", f"train.datasets=[{ds}]",
                             f"train.storage_path={tmp_path / 'runs'}",
                             f"train.global_batch_tokens={SEQ * 8}", "train.max_steps=2"])  # fmt: skip
    rd = run_dir(cfg)
    holder = _hold_lock(rd)
    ray_before = ray.is_initialized()  # the suite's shared instance may already run
    try:
        with pytest.raises(RunLockedError) as err:
            train(cfg)
        msg = str(err.value)
        assert str(rd) in msg and f"pid {holder.pid} on host" in msg, msg
        # Nothing of a run was started or written besides the lock file.
        assert ray.is_initialized() == ray_before  # the refused run started no Ray
        assert sorted(p.name for p in rd.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: the kernel drops a dead holder's lock
        holder.wait()
    with run_lock(rd), run_lock(rd):  # free again; re-entrant in one process
        assert f"pid {os.getpid()} on host" in (rd / LOCK_NAME).read_text()
