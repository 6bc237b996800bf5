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
