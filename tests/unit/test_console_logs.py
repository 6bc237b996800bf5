"""The console/file split of `cluster.logs`, in-process: which records reach the console."""

from __future__ import annotations

import logging
import sys

import pytest

from cluster.logs import LOG_NAME, console_logs


@pytest.mark.parametrize("name", ["ray.serve", "DeepSpeed"])
def test_a_library_handler_added_later_prints_to_the_file_only(name, tmp_path, capsys) -> None:
    """Ray Serve configures its console handler on `import ray.serve`, DeepSpeed on its first
    import: both can come after the command set up its log file (the quickstart imports Serve
    for its last stage)."""
    late = logging.StreamHandler(sys.stderr)
    with console_logs(tmp_path):
        logger = logging.getLogger(name)
        logger.addHandler(late)
        try:
            logger.warning("library chatter")
            logging.getLogger("training.launcher").warning("raylm warning")
        finally:
            logger.removeHandler(late)
    err = capsys.readouterr().err
    assert "library chatter" not in err and "raylm warning" in err
    assert f"Ray and DeepSpeed logs go to {tmp_path / LOG_NAME}" in err
    logged = (tmp_path / LOG_NAME).read_text()
    assert "library chatter" in logged and "raylm warning" in logged
    assert not logging.getLogger(name).filters  # the command's setup is undone on exit


def test_the_raylets_messages_go_to_the_file_and_ray_gets_its_printer_back(
    tmp_path, capsys
) -> None:
    """Ray's error-channel thread prints the raylet's messages with ``print_to_stdstream`` itself,
    past the worker-line dispatcher (seen on the console: Serve's graceful_shutdown task at every
    Serve shutdown, a warning about worker start-up concurrency)."""
    from ray._private import worker as ray_worker

    original = ray_worker.print_to_stdstream
    message = {"lines": ["Task ServeController.graceful_shutdown failed."], "pid": "raylet",
               "is_err": False}  # fmt: skip
    with console_logs(tmp_path) as setup:
        setup.after_ray_init()
        ray_worker.print_to_stdstream(message, ignore_prefix=False)  # as listen_error_messages
    assert ray_worker.print_to_stdstream is original
    captured = capsys.readouterr()
    assert "graceful_shutdown" not in captured.out + captured.err
    assert (
        "(worker pid=raylet) Task ServeController.graceful_shutdown failed."
        in (tmp_path / LOG_NAME).read_text()
    )
