"""`raylm train` with `train.storage_path: s3://...` on moto's S3 server (127.0.0.1), through the CLI.

Real parts: moto's server speaking the S3 HTTP API, pyarrow's S3 filesystem in the driver and the
Ray Train workers, real DeepSpeed (gloo, 2 workers, ZeRO-2) on the shared local Ray instance. Ray
stores the checkpoints on S3; raylm's side files go up from each process's local mirror. Nothing
of the run may land on local disk under the working dir (a naive ``Path("s3://b/p")`` would make
a local dir ``s3:/b/p``).
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from cluster.cli import main
from tests.conftest import moto_s3_server
from training.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.timeout(400)
SEQ = 32
BUCKET = "ckpt"


@pytest.fixture(scope="module")
def endpoint():
    """moto's S3 server on a free 127.0.0.1 port, for this module."""
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def aws(endpoint, monkeypatch):
    """Credentials in the driver's environment only (the Ray workers were started without them:
    they get them inside the filesystem object); a bucket to train into."""
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    if BUCKET not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=BUCKET)
    return s3


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("s3_data") / "ds", train_rows=96,
                                   validation_rows=16, seq_len=SEQ, vocab_size=64)  # fmt: skip


def _train_args(prepared: Path, endpoint: str, steps: int, *extra: str) -> list[str]:
    sets = [
        "name=s3run",
        f"train.storage_path=s3://{BUCKET}/runs",
        f"train.s3.endpoint_url={endpoint}",
        f"train.datasets=[{prepared}]",
        f"train.global_batch_tokens={SEQ * 8}",
        "train.micro_batch_size=2",
        "train.lr=0.003",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_batches=1",
        f"train.max_steps={steps}",
        "train.progress=false",
        "scaling.num_workers=2",
        "deepspeed.zero_stage=2",
        *extra,
    ]
    return ["train"] + [a for s in sets for a in ("--set", s)]


def _keys(s3, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for p in pages for o in p.get("Contents", []))  # fmt: skip


def _jsonl(s3, key: str) -> list[dict]:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    return [json.loads(x) for x in body.splitlines() if x.strip()]


def _verified_step(s3, run: str, name: str, tmp: Path) -> int:
    """Download one checkpoint with boto3 (not raylm's code) and verify its manifests."""
    from training.checkpoint import verify_checkpoint

    for key in _keys(s3, f"{run}{name}/"):
        if not key or key.endswith("/"):  # directory markers
            continue
        dst = tmp / name / key
        dst.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, f"{run}{name}/{key}", str(dst))
    return verify_checkpoint(tmp / name).step


def test_train_resume_report_and_export_on_s3(
    ray_local, endpoint, aws, prepared, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    run = "runs/s3run/"
    staging = tmp_path / "staging"
    args = _train_args(prepared, endpoint, 4, f"train.s3.staging_dir={staging}")
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    # The ranks staged their shards in train.s3.staging_dir (made by them) and handed each dir to
    # Ray's asynchronous upload, which deleted it once stored.
    assert staging.is_dir() and not list(staging.iterdir()), list(staging.iterdir())
    keys = _keys(aws, run)
    # Ray keeps the newest 2 checkpoints (steps 2 and 4), both ranks' shards merged on S3.
    assert sorted({k.split("/")[0] for k in keys if k.startswith("checkpoint_0")}) == [
        "checkpoint_00000002", "checkpoint_00000004"]  # fmt: skip
    assert {"checkpoint_00000004/integrity/rank_0.json",
            "checkpoint_00000004/integrity/rank_1.json"} <= set(keys)  # fmt: skip
    assert {"metrics.jsonl", "raylm_config.yaml", "workers/rank_0.json",
            "workers/rank_1.json", "tokenizer/tokenizer_config.json"} <= set(keys), keys  # fmt: skip
    assert ".lock" not in keys and ".preempt" not in keys  # lease released, no stop marker
    first = _jsonl(aws, run + "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert _verified_step(aws, run, "checkpoint_00000004", tmp_path / "dl") == 4
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "runs").exists()

    # A shard of the newest checkpoint truncated on S3: the same command with more steps skips it
    # (its manifest fails before anything is unpickled) and resumes from step 2, not from 0.
    shard = f"{run}checkpoint_00000004/global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    body = aws.get_object(Bucket=BUCKET, Key=shard)["Body"].read()
    aws.put_object(Bucket=BUCKET, Key=shard, Body=body[: len(body) // 2])
    assert main(_train_args(prepared, endpoint, steps=6)) == 0, capsys.readouterr().err[-3000:]
    (resume,) = [e for e in _jsonl(aws, run + "events.jsonl") if e["event"] == "resume"]
    # Named by their s3:// URIs, not the workers' temporary downloads.
    assert (resume["step"], resume["checkpoint"]) == (2, f"s3://{BUCKET}/{run}checkpoint_00000002")
    assert len(resume["skipped"]) == 1, resume
    bad = f"s3://{BUCKET}/{run}checkpoint_00000004: global_step4/zero_pp_rank_1"
    assert bad in resume["skipped"][0], resume
    rows = _jsonl(aws, run + "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:2] == first[:2]  # steps 1-2 were not trained again (their rows are the old ones)
    assert rows[-1]["tokens_seen"] == 6 * 8 * SEQ  # the data position came back too
    # Steps 3-6 trained again are stored apart from the broken checkpoint_00000004, so Ray's
    # pruning of that entry (newest 2 kept) cannot delete the fresh step-4 checkpoint with it.
    kept = sorted({k.split("/")[0] for k in _keys(aws, run) if k.startswith("checkpoint_0")})
    assert kept == ["checkpoint_00000004_from00000002", "checkpoint_00000006_from00000002"], kept
    assert _verified_step(aws, run, kept[0], tmp_path / "dl4") == 4
    assert _verified_step(aws, run, kept[1], tmp_path / "dl") == 6
    capsys.readouterr()

    # report and export read the run from S3 with the endpoint from the standard AWS variable.
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    uri = f"s3://{BUCKET}/runs/s3run"
    assert main(["report", uri]) == 0
    out = capsys.readouterr().out
    assert f"run          {uri}\n" in out and "step 2 from checkpoint_00000002" in out, out
    assert "checkpoint_00000006_from00000002" in out.split("checkpoints  ")[1], out
    assert "plots/loss.png" in _keys(aws, run)
    assert main(["export", uri, "--out", str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    prov = json.loads((tmp_path / "hf" / "provenance.json").read_text())
    assert prov["checkpoint"] == f"{uri}/checkpoint_00000006_from00000002" and prov["step"] == 6
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert model.config.vocab_size == 64 and len(tok) == 64


def test_refused_before_any_worker_starts(endpoint, aws, prepared, tmp_path, capsys) -> None:
    """A missing bucket and rejected credentials stop `raylm train` at the config check."""
    before = _keys(aws, "runs/")
    args = _train_args(prepared, endpoint, 2, "train.storage_path=s3://no-such-bucket/runs")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "train.storage_path: s3://no-such-bucket/runs: bucket 'no-such-bucket' does not " \
           f"exist at {endpoint}" in err  # fmt: skip

    _moto_auth(endpoint, "0")  # from now on moto checks the keys against its IAM (none known)
    try:
        assert main(_train_args(prepared, endpoint, 2)) == 2
    finally:
        _moto_auth(endpoint, "inf")
    err = capsys.readouterr().err
    assert f"train.storage_path: s3://{BUCKET}/runs: access denied at {endpoint}" in err, err
    assert "AWS_ACCESS_KEY_ID" in err
    assert _keys(aws, "runs/") == before  # no lease, no config, no Ray experiment dir


def _moto_auth(endpoint: str, count: str) -> None:
    """moto's switch for IAM access checks: after ``count`` requests every request is checked."""
    req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(),
                                 headers={"Content-Type": "text/plain"}, method="POST")  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
