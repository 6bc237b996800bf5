"""Job submission pieces without a cluster: the shipped runtime env, the upload-size refusal, and
how `ray_session` picks the cluster to join."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, RayConfig
from cluster.ray_env import WORKER_ENV, _join_runtime_env, cluster_address
from cluster.runtime_env import (
    DEFAULT_EXCLUDES,
    MIB,
    UploadTooLarge,
    build_runtime_env,
    check_upload_size,
    upload_size,
)

REPO = Path(__file__).resolve().parents[2]


def _big_file(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(mib * MIB)  # sparse: st_size counts, the disk does not fill


def test_upload_over_the_limit_is_refused_naming_the_file(tmp_path) -> None:
    (tmp_path / "train.py").write_text("print('hi')\n")
    _big_file(tmp_path / "weights" / "model.ckpt", 101)
    with pytest.raises(UploadTooLarge) as err:
        build_runtime_env(tmp_path)
    msg = str(err.value)
    assert "100 MiB" in msg and "weights/model.ckpt (101.0 MiB)" in msg and "excludes" in msg


def test_excluded_and_gitignored_files_do_not_count(tmp_path) -> None:
    (tmp_path / "train.py").write_text("x = 1\n")
    _big_file(tmp_path / "runs" / "ckpt.bin", 150)  # default exclude: runs
    _big_file(tmp_path / "out" / "big.npy", 150)  # .gitignore'd, as Ray honours it
    _big_file(tmp_path / "extra" / "blob", 150)  # caller's exclude
    (tmp_path / ".gitignore").write_text("out/\n")
    env = build_runtime_env(tmp_path, excludes=["extra"])
    size = upload_size(tmp_path, env["excludes"])
    assert size.files == 2 and size.total_bytes < 1024  # train.py and .gitignore
    assert env["working_dir"] == str(tmp_path.resolve())
    assert env["env_vars"] == {"TOKENIZERS_PARALLELISM": "false"}
    # The same tree without the caller's exclude is over the limit.
    with pytest.raises(UploadTooLarge, match="extra/blob"):
        check_upload_size(tmp_path, DEFAULT_EXCLUDES)


def test_this_repo_uploads_far_below_the_limit() -> None:
    size = check_upload_size(REPO)
    assert size.total_bytes < 20 * MIB, size.largest
    rels = [rel for _, rel in size.largest]
    assert not any(r.startswith((".git/", ".venv/", "runs/")) for r in rels), rels


def test_secrets_never_go_into_a_runtime_env(tmp_path) -> None:
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN"):
        build_runtime_env(tmp_path, env_vars={"RAY_AUTH_TOKEN": "x" * 64})


def test_shipped_yaml_matches_the_python_runtime_env() -> None:
    text = (REPO / "cluster" / "runtime_env.yaml").read_text()
    assert text.startswith("# ") and "ray job submit" in text.splitlines()[1]
    env = yaml.safe_load(text)
    assert env["excludes"] == DEFAULT_EXCLUDES
    assert env["working_dir"] == "."
    assert env["env_vars"] == {"TOKENIZERS_PARALLELISM": "false"}


def test_cluster_address_precedence(monkeypatch, tmp_path) -> None:
    # Ray's record of a `ray start` cluster lives in the default temp dir; point it at an empty one.
    monkeypatch.setattr("ray._private.services.find_bootstrap_address", lambda _tmp: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(RayConfig()) is None  # nothing running: start local Ray
    assert cluster_address(RayConfig(address="10.0.0.1:6379")) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")  # what `ray job submit` sets
    assert cluster_address(RayConfig()) == "auto"
    assert cluster_address(RayConfig(address="10.0.0.1:6379")) == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.2:8265")
    with pytest.raises(ConfigError, match="RAY_ADDRESS: http://10.0.0.2:8265 is a dashboard"):
        cluster_address(RayConfig())
    with pytest.raises(ConfigError, match="ray.address"):
        cluster_address(RayConfig(address="http://h:8265"))
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr("ray._private.services.find_bootstrap_address", lambda _t: "1.2.3.4:6379")
    assert cluster_address(RayConfig()) == "auto"  # `ray start` on this machine: join it


def test_join_runtime_env_leaves_out_keys_the_job_sets(monkeypatch) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _join_runtime_env() == {"env_vars": WORKER_ENV}
    # Inside `ray job submit --runtime-env cluster/runtime_env.yaml`: Ray refuses a key set twice.
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": dict(WORKER_ENV)}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert _join_runtime_env() is None
