"""S3 run-dir helpers: addresses, refusals, the local mirror and the lease, without a server.

The mirror, checkpoint listing and lease take any pyarrow filesystem; here a local dir stands in
for the bucket (pyarrow's LocalFileSystem, real files). The S3 server cases (missing bucket,
rejected credentials, a whole run) are in tests/integration/test_train_s3.py.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.config import ConfigError, load_config
from training import runlock
from training.errors import RunLockedError, TrainConfigError
from training.storage import (
    Mirror,
    _explain,
    check_s3_storage,
    download_checkpoints,
    list_checkpoints,
    parse_s3,
    run_uri,
)


def test_run_uri_local_is_the_resolved_path_and_s3_drops_options(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_uri("runs/train", "a") == str(tmp_path / "runs" / "train" / "a")
    assert run_uri("s3://b/p/?endpoint_override=h:9000&scheme=http", "a") == "s3://b/p/a"


def test_endpoint_and_region_precedence(monkeypatch) -> None:
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    assert parse_s3("s3://b/p").endpoint is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:1")
    assert parse_s3("s3://b/p").endpoint == "http://env:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://env-s3:2")
    assert parse_s3("s3://b/p").endpoint == "http://env-s3:2"
    assert parse_s3("s3://b/p", "http://cfg:3").endpoint == "http://cfg:3"
    loc = parse_s3("s3://b/p?endpoint_override=uri:4&scheme=http&region=r1", "http://cfg:3", "r2")
    assert (loc.path, loc.bucket, loc.endpoint, loc.region) == ("b/p", "b", "http://uri:4", "r1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "r3")
    assert parse_s3("s3://b/p").region == "r3"
    with pytest.raises(TrainConfigError, match=r"train\.storage_path: .*unknown option.*'color'"):
        parse_s3("s3://b/p?color=red")


def test_config_refuses_other_schemes_and_a_missing_bucket() -> None:
    with pytest.raises(ConfigError, match=r"train\.storage_path: .*s3://bucket/prefix"):
        load_config(None, ["train.storage_path=gs://b/p"])
    with pytest.raises(ConfigError, match=r"train\.storage_path: .*no bucket"):
        load_config(None, ["train.storage_path=s3:///p"])
    assert load_config(None, ["train.storage_path=s3://b/p"]).train.s3.endpoint_url is None
    with pytest.raises(ConfigError, match=r"train\.s3\.staging_dir: .*an absolute path.*'stage'"):
        load_config(None, ["train.s3.staging_dir=stage"])
    assert (
        load_config(None, ["train.s3.staging_dir=/fast/stage"]).train.s3.staging_dir
        == "/fast/stage"
    )


def test_unreachable_endpoint_is_refused_naming_the_key(monkeypatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrainConfigError) as err:
        check_s3_storage("s3://bkt/runs", f"http://127.0.0.1:{port}", "us-east-1")
    msg = str(err.value)
    assert msg.startswith("train.storage_path: s3://bkt/runs: cannot reach the S3 endpoint ")
    assert f"http://127.0.0.1:{port}" in msg and "AWS_ENDPOINT_URL" in msg


def test_access_denied_says_whose_credentials(monkeypatch) -> None:
    loc = parse_s3("s3://bkt/runs", "http://127.0.0.1:9", "us-east-1")
    exc = OSError("When getting information for bucket 'bkt': AWS Error ACCESS_DENIED during "
                  "HeadBucket operation: No response body.")  # fmt: skip
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    assert "no AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the driver's environment" in _explain(
        exc, loc
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA")
    assert "the credentials from AWS_ACCESS_KEY_ID may not read and write bucket 'bkt'" in _explain(
        exc, loc
    )


def _bucket(tmp_path: Path) -> tuple[pafs.FileSystem, Path]:
    remote = tmp_path / "bucket" / "run"
    remote.mkdir(parents=True)
    return pafs.LocalFileSystem(), remote


def test_mirror_pulls_side_files_only_and_pushes_what_changed(tmp_path) -> None:
    fs, remote = _bucket(tmp_path)
    for rel in ("metrics.jsonl", "row_ids/rank_1.jsonl", "checkpoint_00000002/latest", ".lock",
                "plots/loss.png"):  # fmt: skip
        (remote / rel).parent.mkdir(parents=True, exist_ok=True)
        (remote / rel).write_text(rel)
    m = Mirror(fs, str(remote), tmp_path / "local")
    m.pull()
    got = sorted(p.relative_to(m.local).as_posix() for p in m.local.rglob("*") if p.is_file())
    assert got == ["metrics.jsonl", "row_ids/rank_1.jsonl"]
    (remote / "row_ids/rank_1.jsonl").write_text("newer, written by rank 1")
    (m.local / "metrics.jsonl").write_text("row 1\n")
    (m.local / "events.jsonl").write_text("resume\n")
    (m.local / ".preempt").write_text("local marker\n")
    m.push()
    # Changed and new files went up; the unchanged pulled copy did not overwrite rank 1's file.
    assert (remote / "metrics.jsonl").read_text() == "row 1\n"
    assert (remote / "events.jsonl").read_text() == "resume\n"
    assert (remote / "row_ids/rank_1.jsonl").read_text() == "newer, written by rank 1"
    assert (remote / ".preempt").exists() is False
    (m.local / "metrics.jsonl").write_text("row 1\nrow 2\n")
    m.push(throttle=True)  # just pushed: a metrics-only report waits
    assert (remote / "metrics.jsonl").read_text() == "row 1\n"
    m.push()
    assert (remote / "metrics.jsonl").read_text() == "row 1\nrow 2\n"


def test_checkpoints_newest_first_downloaded_one_at_a_time(tmp_path) -> None:
    fs, remote = _bucket(tmp_path)
    for step in (2, 4, 6):
        (remote / f"checkpoint_0000000{step}" / "sub").mkdir(parents=True)
        (remote / f"checkpoint_0000000{step}" / "sub" / "shard").write_text(str(step))
    (remote / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's file, not a checkpoint
    ckpts = list_checkpoints(fs, str(remote), first=str(remote / "checkpoint_00000004"))
    assert [Path(p).name for p in ckpts] == [f"checkpoint_0000000{s}" for s in (4, 6, 2)]
    seen = []
    for local in download_checkpoints(fs, ckpts):
        seen.append((local.name, (local / "sub" / "shard").read_text()))
        assert [p for p in seen if Path(local.parent, p[0]).exists()] == [seen[-1]]
        if len(seen) == 2:
            break
    assert seen == [("checkpoint_00000004", "4"), ("checkpoint_00000006", "6")]
    assert not local.parent.exists()  # scratch deleted when the loop left the generator


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(runlock, "SETTLE_S", 0.01)
    fs, remote = _bucket(tmp_path)
    lock = remote / runlock.LOCK_NAME
    with runlock.run_lease(fs, str(remote), "s3://b/run"):
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid()
        with runlock.run_lease(fs, str(remote), "s3://b/run"):  # re-entrant in one process
            pass
        assert lock.exists()
        with pytest.raises(RunLockedError, match=rf"s3://b/run: .*pid {os.getpid()} on host"):
            runlock._take_lease(fs, str(lock), "s3://b/run")  # another driver, same moment
    assert not lock.exists()
    # A lease whose heartbeat stopped LEASE_TTL_S ago belongs to a dead driver: taken over.
    lock.write_text(json.dumps({**held, "heartbeat": time.time() - runlock.LEASE_TTL_S - 1}))
    with runlock.run_lease(fs, str(remote), "s3://b/run"):
        assert json.loads(lock.read_text())["owner"] != held["owner"]
    assert not lock.exists()


def test_driver_stop_marker_reaches_rank_0_through_the_bucket(tmp_path, monkeypatch) -> None:
    """driver_sigterm's marker in the driver's mirror -> the bucket -> rank 0's mirror, where
    training.preempt.stop_flags looks; a marker left by a killed driver is cleared first."""
    from training import storage
    from training.preempt import MARKER_NAME

    monkeypatch.setattr(storage, "POLL_S", 0.05)
    fs, remote = _bucket(tmp_path)
    (remote / MARKER_NAME).write_text("left by a driver killed while stopping")
    local = tmp_path / "driver"
    local.mkdir()
    driver = storage.RunView("s3://b/run", local, Mirror(fs, str(remote), local))
    rank0 = Mirror(fs, str(remote), tmp_path / "rank0")
    rank0.local.mkdir()
    down = storage._marker_down(rank0)
    with driver.follow(progress=False):
        assert not (remote / MARKER_NAME).exists() and down() is False
        (local / MARKER_NAME).write_text("SIGTERM to pid 1\n")  # the driver's handler
        deadline = time.monotonic() + 30
        while not (remote / MARKER_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert down() is True and (rank0.local / MARKER_NAME).exists()
    assert not (remote / MARKER_NAME).exists()  # the next run starts unmarked


def test_a_worker_pulls_back_only_the_files_it_writes() -> None:
    from training.storage import _owned_by

    assert _owned_by("row_ids/rank_1.jsonl", 1) and _owned_by("workers/rank_1.json", 1)
    assert not _owned_by("row_ids/rank_1.jsonl", 0) and not _owned_by("row_ids/rank_10.jsonl", 1)
    assert _owned_by("metrics.jsonl", 0) and _owned_by("tokenizer/tokenizer.json", 0)
    assert not _owned_by("metrics.jsonl", 1)


def test_in_place_manifests_share_the_files_and_catch_a_truncated_one(tmp_path) -> None:
    """A checkpoint written in place: 3 ranks hash disjoint shares that together cover every file;
    the dir verifies, and one truncated file fails it, named."""
    from training.checkpoint import TrainState, verify_checkpoint, write_integrity, write_state
    from training.errors import CheckpointError

    write_state(tmp_path, TrainState(step=4, world_size=3))
    for name in ("global_step4/zero_pp_rank_0_optim.pt", "global_step4/zero_pp_rank_1_optim.pt",
                 "global_step4/zero_pp_rank_2_optim.pt", "rng/rank_0.pt", "config.json"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode() * 10)
    shares = [json.loads(write_integrity(tmp_path, r, share=(r, 3)).read_text()) for r in range(3)]
    keys = [set(s) for s in shares]
    assert all(keys) and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert set().union(*keys) == {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                                  if p.is_file() and p.parent.name != "integrity"}  # fmt: skip
    assert verify_checkpoint(tmp_path).step == 4
    victim = tmp_path / "global_step4/zero_pp_rank_1_optim.pt"
    victim.write_bytes(victim.read_bytes()[:5])
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_optim.pt"):
        verify_checkpoint(tmp_path)


def test_finished_checkpoint_is_the_last_step_that_verifies_and_hashes_nothing_else(
    tmp_path, monkeypatch
) -> None:
    """What lets a re-run skip its workers: a verified checkpoint of the last step. A run with
    steps left is told by its newest state file, without hashing a checkpoint (the workers verify
    what they load; a second hash of a large model's optimizer state would cost minutes)."""
    from types import SimpleNamespace

    import training.checkpoint as ckpt_mod
    from training.checkpoint import TrainState, write_integrity, write_state
    from training.launcher import finished_checkpoint

    keys = {"seed": 0}

    def ckpt(name: str, step: int, corrupt: bool = False) -> Path:
        d = tmp_path / name
        (d / f"global_step{step}").mkdir(parents=True)
        (d / f"global_step{step}" / "optim_states.pt").write_bytes(b"x" * 64)
        write_state(d, TrainState(step=step, resume_keys=keys))
        write_integrity(d, 0)
        if corrupt:  # a partial upload
            (d / f"global_step{step}" / "optim_states.pt").write_bytes(b"x" * 8)
        hashed.clear()  # what writing the manifest hashed
        return d

    hashed: list[Path] = []
    real = ckpt_mod._sha256
    monkeypatch.setattr(ckpt_mod, "_sha256", lambda p: hashed.append(p) or real(p))
    job = SimpleNamespace(total_steps=8, resume_keys=keys)
    assert finished_checkpoint(tmp_path, job) is None  # no checkpoint yet
    ckpt("checkpoint_00000006", 6)
    assert finished_checkpoint(tmp_path, job) is None and hashed == []  # steps left
    ckpt("checkpoint_00000008", 8, corrupt=True)
    assert finished_checkpoint(tmp_path, job) is None  # broken: the workers fall back to step 6
    twin = ckpt("checkpoint_00000008_from00000006", 8)
    found, state = finished_checkpoint(tmp_path, job)
    assert found == twin and state.step == 8
    hashed.clear()  # what verifying the twin hashed
    more = SimpleNamespace(total_steps=10, resume_keys=keys)  # train.max_steps raised
    assert finished_checkpoint(tmp_path, more) is None and hashed == []
    other = SimpleNamespace(total_steps=8, resume_keys={"seed": 1})  # refused by the driver anyway
    assert finished_checkpoint(tmp_path, other) is None
