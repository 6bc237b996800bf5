"""SIGTERM handling of the Ray-free loop (one process, gloo): the stop request of the driver (marker
file) or of this process (signal) ends the loop at the next step boundary with a checkpoint."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.unit.test_train_loop import _job
from training import preempt
from training.loop import WorkerIO, run_worker
from training.records import read_events
from training.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("preempt") / "ds", train_rows=32,
                                   validation_rows=8, seq_len=32)  # fmt: skip


def _io(reports: list, after_step=None) -> WorkerIO:
    def report(metrics, checkpoint_dir, step, dir_name=None):
        reports.append((step, checkpoint_dir is not None))

    return WorkerIO(0, 1, report, after_step=after_step)


@pytest.mark.timeout(300)
def test_driver_marker_stops_after_the_current_step_with_a_checkpoint(dataset, tmp_path) -> None:
    reports: list = []

    def driver_sigterm_during_step_2(step: int, rank: int) -> None:
        if step == 2:
            (tmp_path / preempt.MARKER_NAME).write_text("test")

    state = run_worker(_job(dataset, tmp_path, max_steps=6),
                       _io(reports, driver_sigterm_during_step_2))  # fmt: skip
    assert state.step == 2
    assert reports == [(1, False), (2, False), (2, True)]  # the step's row, then its checkpoint
    assert [(e["event"], e["step"], e["reason"]) for e in read_events(tmp_path)] == [
        ("preempt", 2, "SIGTERM to the driver")
    ]


@pytest.mark.timeout(300)
def test_sigterm_to_the_worker_process_stops_at_the_step_boundary(dataset, tmp_path) -> None:
    reports: list = []
    previous = signal.getsignal(signal.SIGTERM)
    preempt.install_worker_handler()  # pytest runs tests on the main thread

    def sigterm_at_step_3(step: int, rank: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        state = run_worker(_job(dataset, tmp_path, max_steps=6), _io(reports, sigterm_at_step_3))
    finally:
        preempt._uninstall_worker_handler(previous)
    assert state.step == 3 and reports[-1] == (3, True)
    assert read_events(tmp_path)[-1]["reason"] == "SIGTERM to a worker"
    assert Path(tmp_path / "metrics.jsonl").read_text().count("\n") == 3


def test_driver_sigterm_writes_the_marker_once_and_a_second_one_escalates(tmp_path) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        (tmp_path / preempt.MARKER_NAME).write_text("left by an earlier preempted run")
        with preempt.driver_sigterm(tmp_path):
            assert not (tmp_path / preempt.MARKER_NAME).exists()  # stale marker cleared
            signal.raise_signal(signal.SIGTERM)
            assert (tmp_path / preempt.MARKER_NAME).exists() and seen == []
            signal.raise_signal(signal.SIGTERM)  # second: the replaced handler runs
            assert seen == [signal.SIGTERM]
        assert not (tmp_path / preempt.MARKER_NAME).exists()
        signal.raise_signal(signal.SIGTERM)  # restored after the run
        assert seen == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_worker_sigterm_is_seen_before_python_runs_the_handler() -> None:
    """In a Ray worker the loop runs off the main thread, whose Python handler may run seconds
    later: the stop request must come from the interpreter's wakeup pipe alone."""
    previous = signal.getsignal(signal.SIGTERM)
    preempt.install_worker_handler()
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a handler that never tells
        assert not preempt._sigterm_seen()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt._sigterm_seen()
    finally:
        preempt._uninstall_worker_handler(previous)
    assert not preempt._sigterm_seen()


def test_stop_reason_reads_the_flags_summed_over_ranks(tmp_path) -> None:
    """The loop sums every rank's (marker, SIGTERM) flags in its one per-step all_reduce."""
    assert preempt.stop_reason([0.0, 0.0]) is None
    assert preempt.stop_reason([1.0, 0.0]) == "SIGTERM to the driver"
    assert preempt.stop_reason([0.0, 3.0]) == "SIGTERM to a worker"  # 3 ranks saw it
    assert preempt.stop_reason([1.0, 1.0]) == "SIGTERM to the driver and SIGTERM to a worker"
    (tmp_path / preempt.MARKER_NAME).write_text("stop\n")
    assert preempt.stop_flags(str(tmp_path), rank=0)[0] == 1.0
    assert preempt.stop_flags(str(tmp_path), rank=1)[0] == 0.0  # only rank 0 reads the marker
