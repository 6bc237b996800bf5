"""`data prepare` reading s3:// shards from a real S3 server (moto_server) on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.conftest import moto_s3_server, prepare_data


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)


def test_s3_inputs_give_the_same_dataset_as_local(
    s3_server, aws_env, prepared_pretrain, synth_corpus, tokenizer_dir, tmp_path
):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    s3.create_bucket(Bucket="corpus")
    for f in sorted((synth_corpus / "pretrain").glob("*.jsonl")):
        s3.upload_file(str(f), "corpus", f"raw/pretrain/{f.name}")
    s3.put_object(Bucket="corpus", Key="raw/pretrain/notes.bin", Body=b"ignored: unknown format")
    result = prepare_data(
        tokenizer_dir,
        inputs=["s3://corpus/raw/pretrain/"],
        output=str(tmp_path / "out"),
        seq_len=128,
        validation_fraction=0.1,
        rows_per_file=64,
        s3={"endpoint_url": s3_server, "region": "us-east-1"},
    )
    local = prepared_pretrain.manifest
    assert result.manifest["checksums"] == local["checksums"]
    assert sorted(result.manifest["inputs"]) == [
        f"s3://corpus/raw/pretrain/{f.name}"
        for f in sorted((synth_corpus / "pretrain").glob("*.jsonl"))
    ]
    # a glob and a missing prefix
    globbed = prepare_data(
        tokenizer_dir,
        inputs=["s3://corpus/raw/pretrain/shard-0000[01].jsonl"],
        output=str(tmp_path / "glob"),
        seq_len=128,
        s3={"endpoint_url": s3_server},
    )
    assert len(globbed.manifest["inputs"]) == 2
    from data_pipelines.errors import DataError

    with pytest.raises(DataError, match=r"data.inputs\[0\]: s3://corpus/nothing/: no such object"):
        prepare_data(
            tokenizer_dir,
            inputs=["s3://corpus/nothing/"],
            output=str(tmp_path / "x"),
            s3={"endpoint_url": s3_server},
        )
