"""SIGTERM (spot preemption, ``ray job stop``): checkpoint at the next step boundary, then stop.

Two ways a stop request reaches the loop, both Ray-free so the single-process loop has them too:
- the driver (``raylm train``) gets SIGTERM: its handler writes the marker ``RUN_DIR/.preempt``,
  which rank 0 looks for after every step (one ``stat``; the run dir is shared storage);
- a worker process gets SIGTERM: :func:`install_worker_handler` (run on the process's main
  thread; Ray Train runs the loop in another thread, where ``signal.signal`` is refused) replaces
  Ray's default of exiting at once. Python runs a signal's handler only when the main thread next
  executes Python, which in a Ray worker can be seconds later, so the handler only arms the
  second-signal escalation; the loop learns of the signal from the byte the interpreter's C-level
  handler writes at once to a wakeup pipe (``signal.set_wakeup_fd``, as asyncio does).
The loop adds those flags (:func:`stop_flags`) up over the ranks in its one all_reduce per step, so
every rank takes the same decision (a rank that stopped alone would leave the others hanging in the
next collective).

A second SIGTERM to the driver stops it at once through the handler it replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_PREEMPTED",
    "MARKER_NAME",
    "driver_sigterm",
    "install_worker_handler",
    "stop_flags",
    "stop_reason",
]

log = logging.getLogger(__name__)
MARKER_NAME = ".preempt"
# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry".
EXIT_PREEMPTED = 75
_REASONS = ("SIGTERM to the driver", "SIGTERM to a worker")
_worker_sigterm = threading.Event()
_wakeup_read: int | None = None  # read end of the wakeup pipe; one byte per caught signal


def _call_previous(previous: Any, signum: int, frame: Any) -> None:
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # SIG_DFL (or unknown): terminate as if never handled
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def driver_sigterm(run_dir: str | Path) -> Iterator[None]:
    """While training: the driver's first SIGTERM asks the workers to checkpoint and stop.

    Clears a marker left by an earlier preempted run first (call it under the run lock).
    """
    marker = Path(run_dir) / MARKER_NAME
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        if marker.exists():  # second SIGTERM: stop waiting for the checkpoint
            _call_previous(previous, signum, frame)
            return
        marker.write_text(f"SIGTERM to pid {os.getpid()} at {time.time():.3f}\n", "utf-8")
        print("raylm train: SIGTERM: checkpointing at the next step boundary, then stopping "
              "(SIGTERM again stops at once)", file=sys.stderr, flush=True)  # fmt: skip

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        marker.unlink(missing_ok=True)


def _watch_wakeup_fd() -> None:
    global _wakeup_read
    if _wakeup_read is not None:
        return
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    old = signal.set_wakeup_fd(write)
    if old != -1:  # someone else's pipe (an event loop): keep theirs, rely on the handler
        signal.set_wakeup_fd(old)
        os.close(read)
        os.close(write)
        return
    _wakeup_read = read


def _sigterm_seen() -> bool:
    """Any thread: has this process received SIGTERM (drains the wakeup pipe)?"""
    if _wakeup_read is not None:
        with contextlib.suppress(BlockingIOError):
            if signal.SIGTERM in os.read(_wakeup_read, 512):
                _worker_sigterm.set()
    return _worker_sigterm.is_set()


def install_worker_handler() -> None:
    """Main thread of a worker process: the first SIGTERM asks the loop to stop at the next step
    boundary; a second one does what the replaced handler did (Ray's: exit)."""
    _watch_wakeup_fd()
    previous = signal.getsignal(signal.SIGTERM)
    calls = [0]  # the pipe may have set the flag already: count this handler's own runs

    def handler(signum: int, frame: Any) -> None:
        calls[0] += 1
        _worker_sigterm.set()
        if calls[0] > 1:
            _call_previous(previous, signum, frame)

    signal.signal(signal.SIGTERM, handler)


def _uninstall_worker_handler(previous: Any) -> None:
    """Tests: undo :func:`install_worker_handler` in this process."""
    global _wakeup_read
    signal.signal(signal.SIGTERM, previous)
    if _wakeup_read is not None:
        os.close(signal.set_wakeup_fd(-1))
        os.close(_wakeup_read)
        _wakeup_read = None
    _worker_sigterm.clear()


def stop_flags(run_dir: str, rank: int) -> tuple[float, float]:
    """This rank's (driver marker seen, SIGTERM seen) flags; the loop adds them up over the ranks
    in its one per-step all_reduce, and :func:`stop_reason` reads the sums."""
    marker = rank == 0 and os.path.exists(os.path.join(run_dir, MARKER_NAME))
    return float(marker), float(_sigterm_seen())


def stop_reason(summed: Sequence[float]) -> str | None:
    """Why the run must stop now, from :func:`stop_flags` summed over the ranks; None: go on."""
    return " and ".join(reason for reason, f in zip(_REASONS, summed, strict=True) if f) or None
