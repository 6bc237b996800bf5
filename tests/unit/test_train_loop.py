"""The per-worker loop without Ray: one process, world size 1, gloo (as a GPU benchmark runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import DeepSpeedConfig, ModelConfig, TrainConfig
from training.data import dataset_info
from training.errors import NonFiniteError
from training.loop import WorkerIO, WorkerJob, prefer_interpreter_ninja, run_worker, skip_cpu_shm_op
from training.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("loop") / "ds", train_rows=32,
                                   validation_rows=8, seq_len=32)  # fmt: skip


def _job(dataset: Path, run_dir: Path, **train_kw) -> WorkerJob:
    train = TrainConfig(global_batch_tokens=32 * 8, micro_batch_size=4, log_every=1,
                        checkpoint_every=100, warmup_steps=0, **train_kw)  # fmt: skip
    return WorkerJob(model=ModelConfig(), train=train, deepspeed=DeepSpeedConfig(zero_stage=0),
                     seed=0, run_dir=str(run_dir), datasets=[dataset_info(str(dataset))],
                     weights=[1.0], seq_len=32, vocab_size=64, pad_id=0,
                     total_steps=train.max_steps or 3, config_hash="test")  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "reporter_deletes", [False, True], ids=["loop_deletes", "reporter_deletes"]
)
def test_loop_runs_without_ray_and_reports(dataset, tmp_path, reporter_deletes) -> None:
    reports: list[tuple[int, bool]] = []
    staged: list[Path] = []

    def report(metrics, checkpoint_dir, step, dir_name=None):
        reports.append((step, checkpoint_dir is not None))
        if checkpoint_dir is not None:
            assert (checkpoint_dir / "integrity" / "rank_0.json").is_file(), "reported incomplete"
            staged.append(checkpoint_dir)

    staging, run = tmp_path / "staging", tmp_path / "run"
    job = _job(dataset, run, max_steps=3, lr=3e-3, s3={"staging_dir": str(staging)})
    state = run_worker(job, WorkerIO(0, 1, report, reporter_deletes_checkpoints=reporter_deletes))
    assert state.step == 3 and state.tokens_seen == 3 * 8 * 32
    assert reports == [(1, False), (2, False), (3, True)]  # checkpoint at the end
    # Staged under train.s3.staging_dir; a reporter that uploads in the background (Ray's ASYNC
    # mode) deletes the dir itself once stored, so the loop must leave it; otherwise the loop
    # deletes it when the report returns.
    assert [p.parent for p in staged] == [staging]
    assert staged[0].exists() is reporter_deletes
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr"] == pytest.approx(3e-3)  # warmup_steps 0: full lr from step 1
    assert "eval_loss" in rows[-1] and rows[-1]["perplexity"] > 1


@pytest.mark.timeout(300)
def test_nonfinite_loss_stops_naming_step_and_rank(dataset, tmp_path) -> None:
    # An absurd learning rate blows the weights up after step 1; step 2 is not finite.
    job = _job(dataset, tmp_path, max_steps=3, lr=1e30, grad_clip=0.0)
    with pytest.raises(
        NonFiniteError, match=r"step 2: non-finite (loss on rank\(s\) \[0\]|gradient norm)"
    ):
        run_worker(job, WorkerIO(0, 1, lambda *a: None))


def test_cpu_runs_do_not_build_deepspeeds_shared_memory_op() -> None:
    """The op serves tensor-parallel inference only; building it cost every fresh venv ~30 s."""
    from deepspeed.comm.torch import build_shm_op

    skip_cpu_shm_op()
    assert build_shm_op() is None


def test_the_interpreters_ninja_comes_first_on_path(tmp_path) -> None:
    """DeepSpeed's op builds use the first ninja on PATH; two versions alternating rebuild every op."""
    bindir, other = tmp_path / "venv" / "bin", "/usr/local/bin:/usr/bin"
    bindir.mkdir(parents=True)
    env = {"PATH": other}
    assert not prefer_interpreter_ninja(env, bindir) and env["PATH"] == other  # no ninja there
    (bindir / "ninja").write_text("")
    assert prefer_interpreter_ninja(env, bindir)
    assert env["PATH"] == f"{bindir}:{other}"
    assert not prefer_interpreter_ninja(env, bindir) and env["PATH"] == f"{bindir}:{other}"
    empty: dict[str, str] = {}
    assert prefer_interpreter_ninja(empty, bindir) and empty["PATH"] == str(bindir)


def test_deepspeeds_muon_module_imports_without_compiling() -> None:
    """deepspeed.initialize imports Muon whatever the optimizer; its import-time torch.compile
    pulled in torch._inductor in every worker (2.6 s of CPU). A fresh interpreter, as a worker."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from training.loop import import_muon_uncompiled, MUON_MODULE\n"
        "real = torch.compile\n"
        "assert import_muon_uncompiled() and MUON_MODULE in sys.modules\n"
        "assert torch.compile is real, 'torch.compile restored'\n"
        "assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor imported'\n"
        "assert not import_muon_uncompiled()  # once per process\n"
        "from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam  # as ZeRO does\n"
        "from deepspeed.runtime.zero.muon.original_muon import muon_update\n"
        "assert muon_update.__wrapped__ and 'torch._inductor.compile_fx' not in sys.modules\n"
    )
    root = Path(__file__).parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def test_deferred_compile_runs_on_the_first_call_once_in_both_forms() -> None:
    from training.loop import compile_on_first_call

    calls: list[tuple[str, dict]] = []

    def fake_compile(fn, **kwargs):
        calls.append((fn.__name__, kwargs))
        return lambda *a: ("compiled", fn(*a))

    deferred = compile_on_first_call(fake_compile)

    def double(x):
        return 2 * x

    def square(x):
        return x * x

    plain, with_options = deferred(double), deferred(dynamic=False)(square)
    assert calls == [] and plain.__name__ == "double"  # nothing compiled at decoration
    assert plain(3) == ("compiled", 6) and plain(4) == ("compiled", 8)
    assert with_options(3) == ("compiled", 9)
    assert calls == [("double", {}), ("square", {"dynamic": False})]
