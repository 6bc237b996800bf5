"""One live ``raylm train`` per run dir: an exclusive ``flock`` on ``RUN_DIR/.lock``.

The lock is held by the driver for the whole run (from before the resolved config is written until
``fit()`` returns). The kernel drops it when the holder's process exits, however it exits, so a
lock left by a dead driver never blocks the next run; NFS (v4, and v3 through lockd) carries
``flock`` as a whole-file POSIX lock. The file keeps the holder's pid, host and start time for the
error message; it is never deleted (deleting a lock file races with a second opener).

Re-entrant within one process: the CLI takes it before writing the resolved config and
``training.launcher.train`` takes it again around ``fit()``.

A run dir on S3 has no ``flock``: :func:`run_lease` writes a lease object ``RUN/.lock`` (owner id,
pid, host, start and heartbeat times, JSON) and rewrites its heartbeat every ``HEARTBEAT_S``. A
lease whose heartbeat is older than ``LEASE_TTL_S`` belongs to a dead driver and is taken over.
S3 has no compare-and-swap that pyarrow exposes, so two drivers starting at the same moment are
told apart by writing, waiting ``SETTLE_S``, and reading back (the later writer wins, the other
refuses): a race remains only if one driver stalls for longer than that between its read and its
write. Hosts' clocks must agree to well within ``LEASE_TTL_S``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from training.errors import RunLockedError

__all__ = ["LEASE_TTL_S", "LOCK_NAME", "run_lease", "run_lock"]

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
LEASE_TTL_S = 120.0  # a lease not renewed for this long belongs to a dead driver
HEARTBEAT_S = 20.0
SETTLE_S = 2.0  # between writing a lease and reading it back (see the module doc)
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


# ---------------------------------------------------------------- S3: a lease object

_leases: dict[str, list[Any]] = {}  # run URI -> [depth, release]: re-entrant like run_lock


def _read_lease(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign object: treat as no live holder
        return None


def _write_lease(fs: Any, path: str, lease: dict[str, Any]) -> None:
    lease["heartbeat"] = time.time()
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(lease).encode())


def _holder_text(lease: dict[str, Any]) -> str:
    age = time.time() - float(lease.get("heartbeat", 0))
    return (f"pid {lease.get('pid')} on host {lease.get('host')} since {lease.get('since')}, "
            f"heartbeat {age:.0f} s ago")  # fmt: skip


def _take_lease(fs: Any, path: str, uri: str) -> dict[str, Any]:
    held = _read_lease(fs, path)
    if held and time.time() - float(held.get("heartbeat", 0)) < LEASE_TTL_S:
        raise RunLockedError(
            f"{uri}: another `raylm train` is running this run ({_holder_text(held)}); wait for "
            f"it to finish or stop it (its lease lapses {LEASE_TTL_S:.0f} s after its last "
            "heartbeat), or give this run another `name`"
        )
    me = {"owner": uuid.uuid4().hex, "pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    _write_lease(fs, path, me)
    time.sleep(SETTLE_S)
    now = _read_lease(fs, path)
    if not now or now.get("owner") != me["owner"]:
        raise RunLockedError(f"{uri}: another `raylm train` took this run's lease at the same "
                             f"time ({_holder_text(now or {})}); retry, or give this run another "
                             "`name`")  # fmt: skip
    return me


def _heartbeat(fs: Any, path: str, lease: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            now = _read_lease(fs, path)
            if now and now.get("owner") != lease["owner"]:
                log.error("%s: the run's lease was taken over by %s (this driver missed its "
                          "heartbeats); two drivers may now write this run", path,
                          _holder_text(now))  # fmt: skip
                return
            _write_lease(fs, path, lease)
        except OSError as exc:  # transient: the lease survives LEASE_TTL_S of failures
            log.warning("%s: lease heartbeat failed: %s", path, exc)


def _hold(fs: Any, path: str, uri: str) -> Callable[[], None]:
    """Take the lease and start its heartbeat; returns the function that releases it."""
    lease = _take_lease(fs, path, uri)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fs, path, lease, stop), daemon=True,
                            name="raylm-lease")  # fmt: skip
    beat.start()

    def release() -> None:
        stop.set()
        beat.join(timeout=30)
        if (_read_lease(fs, path) or {}).get("owner") == lease["owner"]:
            fs.delete_file(path)

    return release


@contextlib.contextmanager
def run_lease(fs: Any, run_path: str, uri: str) -> Iterator[None]:
    """Hold the lease of the S3 run dir ``run_path`` (on ``fs``); RunLockedError at once if a
    live driver holds it. ``uri`` is for messages."""
    if uri in _leases:
        _leases[uri][0] += 1
    else:
        _leases[uri] = [1, _hold(fs, f"{run_path}/{LOCK_NAME}", uri)]
    try:
        yield
    finally:
        _leases[uri][0] -= 1
        if _leases[uri][0] == 0:
            _leases.pop(uri)[1]()
