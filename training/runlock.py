"""One live ``raylm train`` per run dir: an exclusive ``flock`` on ``RUN_DIR/.lock``.

The lock is held by the driver for the whole run (from before the resolved config is written until
``fit()`` returns). The kernel drops it when the holder's process exits, however it exits, so a
lock left by a dead driver never blocks the next run; NFS (v4, and v3 through lockd) carries
``flock`` as a whole-file POSIX lock. The file keeps the holder's pid, host and start time for the
error message; it is never deleted (deleting a lock file races with a second opener).

Re-entrant within one process: the CLI takes it before writing the resolved config and
``training.launcher.train`` takes it again around ``fit()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from training.errors import RunLockedError

__all__ = ["LOCK_NAME", "run_lock"]

LOCK_NAME = ".lock"
# resolved run dir -> [fd, depth]: a second flock on a new fd would conflict with our own.
_held: dict[str, list[int]] = {}


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    return text or "a process that has not written its pid yet"


def _acquire(run_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    # os.open sets O_CLOEXEC: Ray processes this driver spawns later do not inherit the lock.
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunLockedError(
            f"{run_dir}: another `raylm train` is running this run ({holder}); wait for it "
            "to finish or stop it, or give this run another `name`"
        ) from None
    since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode())
    return fd


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock; raises :class:`RunLockedError` at once if a live run holds it."""
    path = Path(run_dir).resolve()
    key = str(path)
    if key in _held:
        _held[key][1] += 1
    else:
        _held[key] = [_acquire(path), 1]
    try:
        yield path
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            os.close(_held.pop(key)[0])  # closing the only fd releases the flock
