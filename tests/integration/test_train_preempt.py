"""SIGTERM to a real `raylm train` driver (spot preemption, `ray job stop`): the workers checkpoint at
the next step boundary and stop, the driver exits with EXIT_PREEMPTED and says so, and the same
command run again resumes from that checkpoint, finishes, and exports (train.export_dir).

The same two runs show the console a user sees: raylm's own lines, no line repeated over and over,
none of Ray's or DeepSpeed's chatter, which is in the run dir's `raylm.log` instead.

The CLI runs as a subprocess joining the session's Ray instance through RAY_ADDRESS, as a driver of
`ray job submit` does (and without a second Ray instance on a small CI box).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.logs import LOG_NAME
from training.checkpoint import verify_checkpoint
from training.preempt import EXIT_PREEMPTED, MARKER_NAME
from training.records import read_events
from training.runlock import LOCK_NAME

ROOT = Path(__file__).parents[2]
STEPS = 24
# Seen on the console of `raylm train` before its output was split between console and log file.
NOISE = [
    "PlacementGroupCleaner",
    "Failed to query Ray Train Controller actor state",
    "Token authentication is enabled",
    "has constructor arguments in the object store",
    "Setting accelerator to CPU",
    "Writing model shards",
    "Loading checkpoint shards",
    "RayTrainWorker pid=",
    "TrainController pid=",
]


def _check_console(text: str, log: Path) -> None:
    """No known noise, no line repeated more than 3 times (a bar's redraws differ in their counts);
    the chatter is in the log file, and Ray's State API answered the cleaner all along."""
    for noise in NOISE:
        assert noise not in text, noise
    lines = [x.strip() for x in re.split(r"[\r\n]+", text) if x.strip()]
    top = max(((lines.count(x), x) for x in set(lines)), default=(0, ""))
    assert top[0] <= 3, top
    assert f"raylm: Ray and DeepSpeed logs go to {log}" in text
    logged = log.read_text()
    assert "RayTrainWorker pid=" in logged and "Setting accelerator to CPU" in logged
    assert "Failed to query Ray Train Controller actor state" not in logged
    assert "deepspeed_shm_comm" not in logged  # CPU workers skip the op's build and load


def _command(prepared, storage: Path, export: Path) -> list[str]:
    sets = [
        "name=pre",
        f"train.datasets=[{prepared.output}]",
        f"train.storage_path={storage}",
        "train.global_batch_tokens=1024",  # 8 rows of 128
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        "train.log_every=1",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=1000",  # only the SIGTERM checkpoint and the final one
        "train.eval_batches=1",
        "train.progress=true",
        f"train.export_dir={export}",
        "scaling.num_workers=1",
        "deepspeed.zero_stage=1",
    ]
    return [sys.executable, "-m", "cluster.cli", "train"] + [a for s in sets for a in ("--set", s)]


def _env(ray) -> dict[str, str]:
    address = ray.get_runtime_context().gcs_address
    return {**os.environ, "RAY_ADDRESS": address, "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}  # fmt: skip


def _wait_for_rows(proc: subprocess.Popen, metrics: Path, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().strip():
            return
        if proc.poll() is not None:
            raise AssertionError(f"raylm train exited early: {proc.communicate()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no metrics row appeared")


@pytest.mark.timeout(900)
def test_sigterm_to_driver_checkpoints_stops_and_the_same_command_resumes(
    ray_local, prepared_pretrain, tmp_path
) -> None:
    storage, export = tmp_path / "runs", tmp_path / "hf"
    cmd, rd = _command(prepared_pretrain, storage, export), storage / "pre"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(ray_local), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_rows(proc, rd / "metrics.jsonl")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, (out, err)
    stops = [e for e in read_events(rd) if e["event"] == "preempt"]
    assert len(stops) == 1 and stops[0]["reason"] == "SIGTERM to the driver"
    step = stops[0]["step"]
    assert 1 <= step < STEPS
    assert f"preempted at step {step}" in err and "re-run the same command to resume" in err
    assert verify_checkpoint(rd / f"checkpoint_{step:08d}").step == step
    assert not (rd / MARKER_NAME).exists() and not export.exists()  # no export of a partial run
    _check_console(out + err, rd / LOG_NAME)

    done = subprocess.run(
        cmd, cwd=ROOT, env=_env(ray_local), capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    resumes = [e for e in read_events(rd) if e["event"] == "resume"]
    assert [(e["step"], Path(e["checkpoint"]).name) for e in resumes] == [
        (step, f"checkpoint_{step:08d}")
    ]
    rows = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert f"{STEPS}/{STEPS}" in done.stderr  # the driver's progress bar reached the end
    _check_console(done.stdout + done.stderr, rd / LOG_NAME)
    assert verify_checkpoint(rd / f"checkpoint_{STEPS:08d}").step == STEPS
    assert (rd / LOCK_NAME).is_file() and list((rd / "tensorboard").glob("events.out.*"))

    from transformers import AutoModelForCausalLM

    prov = json.loads((export / "provenance.json").read_text())
    assert prov["step"] == STEPS and f"exported to {export}" in done.stdout
    model = AutoModelForCausalLM.from_pretrained(str(export), local_files_only=True)
    assert model.config.vocab_size > 0

    # The same command once more: the run is finished, so it starts neither Ray nor a worker, and
    # still exports.
    shutil.rmtree(export)
    again = subprocess.run(
        cmd, cwd=ROOT, env=_env(ray_local), capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, (again.stdout, again.stderr)
    assert f"run 'pre' already finished at step {STEPS}: nothing to train" in again.stdout
    assert "Ray and DeepSpeed logs go to" not in again.stderr  # no Ray session was entered
    last = read_events(rd)[-1]
    assert (last["event"], last["step"], last["finished"]) == ("resume", STEPS, True)
    assert json.loads((export / "provenance.json").read_text())["step"] == STEPS
