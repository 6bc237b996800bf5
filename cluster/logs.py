"""The console belongs to the user: raylm's own lines there, Ray's and DeepSpeed's chatter in a file.

Every command that starts or joins Ray (:func:`cluster.ray_env.ray_session`) writes one log file,
``raylm.log`` in its run or output dir, and prints its path once. Into it go every Python log record
of the driver (Ray, Ray Data, Ray Train, DeepSpeed, transformers, raylm), every line Ray forwards
from the workers (``log_to_driver``), each with its ``(actor pid=…)`` prefix, and the raylet's
messages Ray's error channel prints. The console keeps:
the driver's raylm warnings and errors (``cluster``, ``training``, ``data_pipelines``, ``serving``
loggers), the progress bars and summaries the commands print, and raylm's own warnings from the workers, which
workers mark with ``training.observe.WORKER_MARK`` (``mark_worker_warnings``).

``--verbose`` or ``RAYLM_LOG_LEVEL=debug`` leaves every library's console output as it is (the file
is written too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.observe import RAYLM_LOGGERS, WORKER_MARK

__all__ = ["LOG_NAME", "LogSetup", "console_logs", "restore_ray_printing", "route_worker_lines",
           "verbose_requested"]  # fmt: skip

LOG_NAME = "raylm.log"
# Libraries whose loggers bring their own console handlers (or print at import, like DeepSpeed's
# accelerator line): their handlers are replaced by the file in quiet mode.
LIBRARY_LOGGERS = ("ray", "DeepSpeed", "deepspeed", "transformers", "torch", "peft", "filelock",
                   "urllib3", "httpx", "py.warnings")  # fmt: skip
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers that get a console handler after raylm set up the file (DeepSpeed's when first imported,
# Ray Serve's on `import ray.serve`, which a command may do late): a logger filter sends their
# records to the file alone, whatever handlers they gain later.
SELF_PRINTING = ("DeepSpeed", "ray.serve")


def verbose_requested(flag: bool = False) -> bool:
    """``--verbose``, or ``RAYLM_LOG_LEVEL=debug`` in the environment."""
    return flag or os.environ.get("RAYLM_LOG_LEVEL", "").strip().lower() == "debug"


def _is_raylm(record: logging.LogRecord) -> bool:
    return record.name.split(".", 1)[0] in RAYLM_LOGGERS


class _RaylmOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _is_raylm(record)


class _ToFileOnly(logging.Filter):
    """A logger filter for a library logger that prints itself (DeepSpeed's has a stdout handler
    and no children): its records go to the file handler and nowhere else."""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.handler.level:
            self.handler.handle(record)
        return False


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream in (
        sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__
    )  # fmt: skip


def _quiet_libraries(file_handler: logging.Handler) -> None:
    """Library loggers that print on their own: console handlers off, records to the root (file)."""
    names = [n for n in logging.Logger.manager.loggerDict if n.split(".", 1)[0] in LIBRARY_LOGGERS]
    for name in ["DeepSpeed", *names]:
        logger = logging.getLogger(name)
        consoles = [h for h in logger.handlers if _is_console(h)]
        for h in consoles:
            logger.removeHandler(h)
        if consoles:
            logger.propagate = True
    for name in SELF_PRINTING:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ToFileOnly) for f in logger.filters):
            logger.addFilter(_ToFileOnly(file_handler))


def _quiet_progress_bars() -> None:
    """transformers' own bars (loading and writing checkpoint shards) are chatter here."""
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _WorkerLines:
    """Replaces Ray's printer of forwarded worker output: every line to the file, raylm's marked
    warnings to stderr."""

    def __init__(self, file_handler: logging.FileHandler) -> None:
        self.file = file_handler

    def __call__(self, data: dict[str, Any]) -> None:
        who = (
            f"({data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')})"
        )
        for line in data.get("lines", []):
            if line.startswith(WORKER_MARK):
                print(line[len(WORKER_MARK) :], file=sys.stderr, flush=True)
            stream = self.file.stream
            if stream is not None:
                stream.write(f"{who} {line}\n")
        self.file.flush()


class _RayletLines:
    """Stands in for ``ray._private.worker.print_to_stdstream``, which Ray's error-channel thread
    (``listen_error_messages``) calls directly, past the dispatcher, for the raylet's messages (a
    Serve controller's ``graceful_shutdown`` task reported failed at every Serve shutdown, more
    workers starting than the startup concurrency): to the file, as the workers' lines."""

    def __init__(self, lines: _WorkerLines, original: Any) -> None:
        self.lines, self.original = lines, original

    def __call__(self, data: dict[str, Any], ignore_prefix: bool = False) -> None:
        self.lines(data)


def route_worker_lines(file_handler: logging.FileHandler) -> None:
    """After ``ray.init(log_to_driver=True)``: workers' lines go through :class:`_WorkerLines`,
    and the raylet's through :class:`_RayletLines`, until :func:`restore_ray_printing`."""
    from ray._private import worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    lines = _WorkerLines(file_handler)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("raylm_worker_lines")
    dispatcher.add_handler("raylm_worker_lines", lines)
    current = ray_worker.print_to_stdstream
    original = current.original if isinstance(current, _RayletLines) else current
    ray_worker.print_to_stdstream = _RayletLines(lines, original)


def restore_ray_printing() -> None:
    """Ray's own ``print_to_stdstream`` back (the worker lines' dispatcher handler stays raylm's:
    ``ray.shutdown`` ends its thread)."""
    ray_worker = sys.modules.get("ray._private.worker")
    current = getattr(ray_worker, "print_to_stdstream", None)
    if isinstance(current, _RayletLines):
        ray_worker.print_to_stdstream = current.original


@dataclass
class LogSetup:
    path: Path | None  # the log file; None when the command gave no dir
    file_handler: logging.FileHandler | None
    verbose: bool

    def after_ray_init(self) -> None:
        """Worker lines Ray forwards, and loggers Ray configured while starting, go to the file."""
        if self.file_handler is None or self.verbose:
            return
        _quiet_libraries(self.file_handler)
        route_worker_lines(self.file_handler)


@contextlib.contextmanager
def console_logs(log_dir: str | Path | None, verbose: bool = False) -> Iterator[LogSetup]:
    """Set up the console/file split for one command (``log_dir`` None: console only).

    Call before ``ray.init``, and ``after_ray_init()`` on the yielded setup after it. Restores the
    logging configuration on exit.
    """
    verbose = verbose_requested(verbose)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    added: list[logging.Handler] = []
    path, file_handler = None, None
    if log_dir is not None:
        path = Path(log_dir) / LOG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        added.append(file_handler)
        print(f"raylm: Ray and DeepSpeed logs go to {path}", file=sys.stderr, flush=True)
    console = logging.StreamHandler(sys.stderr)
    # raylm's results and bars are printed; its INFO records are for the file.
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        console.addFilter(_RaylmOnly())
    added.append(console)
    for h in root.handlers:  # a handler someone set before (e.g. basicConfig): raylm's own one now
        root.removeHandler(h)
    for h in added:
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose and file_handler is not None:
        with contextlib.suppress(ImportError):
            import ray.data  # noqa: F401  (Ray Data sets up its console handler on import)
        _quiet_libraries(file_handler)
        _quiet_progress_bars()
    try:
        yield LogSetup(path, file_handler, verbose)
    finally:
        restore_ray_printing()
        for h in added:
            root.removeHandler(h)
            h.close()
        for h in saved[1]:
            root.addHandler(h)
        root.setLevel(saved[0])
        for name in SELF_PRINTING:
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if isinstance(f, _ToFileOnly)]:
                logger.removeFilter(f)
