"""`raylm generate` on the session's local Ray with the tiny model: greedy text equal to
`transformers.generate` per row and the input's row order whatever the actor count and batch size,
bad rows reported by file:line in the error column, a re-run skipped, prompts read from S3."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.cli import main
from tests.conftest import moto_s3_server

PROMPTS = ["Ben was a librarian in the town of", "The parrot", "On Sunday the teacher", "a",
           "Nothing made Ben happier than", "Rewrite in Zorbish: the teacher walks"]  # fmt: skip


def _jsonl_lines() -> list[str]:
    rows = [json.dumps({"id": i, "prompt": p, "max_tokens": 4 + i}) for i, p in enumerate(PROMPTS)]
    rows.insert(2, "{not json")
    rows.insert(4, "")  # blank: not a row
    rows += [json.dumps({"id": 90, "messages": [{"role": "user", "content": "Is it good?"}]}),
             json.dumps({"id": 91, "prompt": "The parrot", "temperature": 7}),
             json.dumps({"id": 92, "prompt": "word " * 300})]  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """a.jsonl (rows, a malformed line, a blank line, a chat row, bad values) and b.parquet."""
    d = tmp_path_factory.mktemp("prompts")
    (d / "a.jsonl").write_text("\n".join(_jsonl_lines()) + "\n")
    pq.write_table(pa.table({"prompt": PROMPTS[:3], "tag": ["x", "y", "z"]}), d / "b.parquet")
    return d


def _expected_sources(name_a: str, name_b: str) -> list[str]:
    lines = [i for i, line in enumerate(_jsonl_lines(), start=1) if line]
    return [f"{name_a}:{i}" for i in lines] + [f"{name_b}:{i}" for i in (1, 2, 3)]


def _args(model, inputs, out, *extra) -> list[str]:
    return [f"--set=generate.model={model}", f"--set=generate.inputs=[{inputs}]",
            f"--set=generate.output={out}", "--set=generate.sampling.temperature=0",
            "--set=generate.sampling.max_tokens=8", "--set=generate.engine.warmup=false",
            *extra]  # fmt: skip


def _read(out) -> list[dict]:
    return pq.read_table(out / "results").to_pylist()


@pytest.fixture(scope="module")
def two_actors(ray_local, tiny_model_dir, inputs, tmp_path_factory):
    """`raylm generate` through the command line: 2 actors, 3 rows per call."""
    out = tmp_path_factory.mktemp("gen2")
    args = _args(tiny_model_dir, inputs, out, "--set=generate.num_actors=2",
                 "--set=generate.batch_size=3")  # fmt: skip
    assert main(["generate", *args]) == 0
    return out, args


def test_rows_keep_input_order_and_equal_transformers_greedy(two_actors, tiny_model_dir, inputs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = _read(two_actors[0])
    a, b = inputs / "a.jsonl", inputs / "b.parquet"
    assert [r["source"] for r in rows] == _expected_sources(str(a), str(b))
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    by_prompt = {}
    for r in rows:
        if r["prompt"] and r["error"] is None:
            by_prompt.setdefault((r["prompt"], r["max_tokens"] or 8), []).append(r)
    assert len(by_prompt) == len(PROMPTS) + 3  # the parquet rows use the config's max_tokens
    for (prompt, n), found in by_prompt.items():
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)).long(),
                             max_new_tokens=n, do_sample=False)[0, len(ids) :].tolist()  # fmt: skip
        text = tok.decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for r in found:
            assert (r["generated_text"], r["completion_tokens"]) == (text, len(ref)), prompt
            assert r["prompt_tokens"] == len(ids) and r["finish_reason"] in ("length", "stop")
    assert [r["tag"] for r in rows[-3:]] == ["x", "y", "z"]


def test_bad_rows_are_reported_by_file_and_line(two_actors, inputs):
    rows = _read(two_actors[0])
    errors = {r["source"]: r["error"] for r in rows if r["error"] is not None}
    a = str(inputs / "a.jsonl")
    assert set(errors) == {f"{a}:3", f"{a}:10", f"{a}:11"}
    assert errors[f"{a}:3"].startswith(f"{a}:3: malformed JSON (")
    assert errors[f"{a}:10"] == f"{a}:10: `temperature` must be in [0, 2] (got 7)"
    assert errors[f"{a}:11"].startswith(f"{a}:11: the prompt has ")
    chat = next(r for r in rows if r["id"] == 90)
    assert chat["error"] is None and chat["completion_tokens"] >= 1
    manifest = json.loads((two_actors[0] / "manifest.json").read_text())
    assert (manifest["rows"], manifest["errors"]) == (len(rows), 3)


def test_a_rerun_is_skipped_and_one_actor_from_s3_writes_the_same_rows(
    two_actors, tiny_model_dir, inputs, tmp_path, monkeypatch, capsys
):
    out, args = two_actors
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()}
    capsys.readouterr()
    assert main(["generate", *args]) == 0
    assert "(already complete: skipped)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").iterdir()} == before
    import boto3

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    with moto_s3_server() as url:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket="prompts")
        for name in ("a.jsonl", "b.parquet"):
            s3.upload_fileobj(io.BytesIO((inputs / name).read_bytes()), "prompts", f"in/{name}")
        s3_args = _args(tiny_model_dir, "s3://prompts/in/", tmp_path / "s3",
                        "--set=generate.num_actors=1", "--set=generate.batch_size=5",
                        f"--set=generate.s3.endpoint_url={url}")  # fmt: skip
        assert main(["generate", *s3_args]) == 0
    local, remote = _read(out), _read(tmp_path / "s3")
    assert [r["source"] for r in remote] == _expected_sources("s3://prompts/in/a.jsonl",
                                                              "s3://prompts/in/b.parquet")  # fmt: skip
    strip = lambda r: {k: v for k, v in r.items() if k not in ("source", "error")}  # noqa: E731
    assert [strip(r) for r in remote] == [strip(r) for r in local]


def test_a_pool_holding_every_cpu_or_an_engine_that_cannot_start_stops_with_one_line(
    ray_local, tiny_model_dir, inputs, tmp_path
):
    import importlib.util

    from data_pipelines.errors import DataError
    from serving.batch_job import generate
    from serving.config import GenerateConfig

    cfg = GenerateConfig(inputs=[str(inputs / "a.jsonl")], output=str(tmp_path / "out"),
                         model=str(tiny_model_dir), num_actors=4, actor_cpus=1.0)  # fmt: skip
    with pytest.raises(DataError, match=r"generate.num_actors \(4\) x generate.actor_cpus \(1.0\) "
                                        r"reserve all 4 CPUs Ray has"):  # fmt: skip
        generate(cfg, progress=False)
    if importlib.util.find_spec("vllm") is not None:
        return  # the vLLM case below needs a machine without it
    vllm = cfg.model_copy(update={"num_actors": 1, "engine": {"backend": "vllm"}})
    with pytest.raises(DataError, match=r"^generate: an engine actor failed to start: .*"
                                        r"generate.engine.backend=vllm needs the `vllm` package"):  # fmt: skip
        generate(GenerateConfig.model_validate(vllm.model_dump()), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
