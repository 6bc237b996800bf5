"""Session-scoped fixtures shared by every test layer.

One local Ray instance serves all integration tests; corpora, tokenizers and prepared datasets are built
once per session and reused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s by default; a finished run then idles up to two
# polls before its worker group shuts down (~4 s of every run here, measured). Set before the
# session's ray.init, so the raylet hands it to every worker, the controllers of CLI subprocesses
# that join this instance included.
TEST_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
os.environ.update(TEST_RAY_ENV)


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's S3 server (a real HTTP S3 stand-in) on a free 127.0.0.1 port; yields its URL."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    exe = exe or shutil.which("moto_server")
    assert exe, "moto_server missing: install the dev extra (moto[server])"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not start within 60 s"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (4 logical CPUs on a 2-core box), with
    the dashboard as `raylm` starts it (Ray Train's placement-group cleaner needs its State API)."""
    import ray

    from cluster.ray_env import WORKER_ENV

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            runtime_env={"env_vars": dict(WORKER_ENV)},
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
    """A small deterministic corpus: pretrain/, sft/train/, sft/heldout/."""
    from data_pipelines.synth import write_corpus

    out = tmp_path_factory.mktemp("corpus")
    write_corpus(str(out), docs=600, seed=0, shards=3)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(ray_local, synth_corpus, tmp_path_factory):
    """A byte-level BPE tokenizer trained once through Ray Data on the synthetic corpus."""
    from data_pipelines.config import DataConfig, TokenizerConfig
    from data_pipelines.tokenizer_train import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    tcfg = TokenizerConfig(
        inputs=[str(synth_corpus / "pretrain"), str(synth_corpus / "sft" / "train")],
        output=str(out),
        vocab_size=1024,
    )
    return train_tokenizer(tcfg, DataConfig(), progress=False)


def prepare_data(tokenizer_dir, **overrides):
    """Run `data prepare` in-process on the session's Ray instance."""
    from data_pipelines.config import DataConfig
    from data_pipelines.prepare import prepare

    cfg = DataConfig(tokenizer=str(tokenizer_dir), **overrides)
    return prepare(cfg, str(tokenizer_dir), progress=False)


@pytest.fixture(scope="session")
def prepared_pretrain(ray_local, synth_corpus, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared_pretrain")
    return prepare_data(
        tokenizer_dir,
        inputs=[str(synth_corpus / "pretrain")],
        output=str(out),
        seq_len=128,
        validation_fraction=0.1,
        rows_per_file=64,
    )


def prepare_sft_data(tokenizer_dir, synth_corpus, out):
    """Packed SFT data (seq_len 128) from the synthetic corpus with the given tokenizer."""
    return prepare_data(
        tokenizer_dir,
        inputs=[str(synth_corpus / "sft" / "train")],
        output=str(out),
        mode="sft",
        seq_len=128,
        validation_fraction=0.1,
        sft={"pack": True},
    )


@pytest.fixture(scope="session")
def prepared_sft(ray_local, synth_corpus, tokenizer_dir, tmp_path_factory):
    return prepare_sft_data(tokenizer_dir, synth_corpus, tmp_path_factory.mktemp("prepared_sft"))


@pytest.fixture(scope="session")
def tiny_model_dir(synth_corpus, tmp_path_factory):
    """A tiny random-init Llama + its tokenizer in one HF dir (safetensors), for serving tests.

    The tokenizer is trained in-process with `build_tokenizer` (no Ray), so engine and HTTP unit tests
    stay Ray-free. generation_config stops at both eos and the end-of-turn token, like an export.
    """
    import json

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from data_pipelines.tokenizer_train import BOS, END_OF_TURN, EOS, PAD, build_tokenizer

    texts = [
        json.loads(line)["text"]
        for shard in sorted((synth_corpus / "pretrain").glob("*.jsonl"))
        for line in shard.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    tok = build_tokenizer(iter(texts), vocab_size=512, min_frequency=2, max_length=256)
    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD, END_OF_TURN)}
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=0.2,  # large random weights: prompt-dependent, non-degenerate greedy text
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=[ids[EOS], ids[END_OF_TURN]], pad_token_id=ids[PAD]
    )
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def train_and_export(name: str, storage, out, overrides: list[str]):
    """raylm's training loop on ``scaling.num_workers`` local processes (``tests.mp_loop``: the
    run dir `raylm train` writes, without a Ray Train run's start-up), then `raylm export` of its
    last checkpoint."""
    from cluster.config import load_config
    from tests.mp_loop import run_loop
    from training.export import export
    from training.launcher import plan_job, run_dir

    cfg = load_config(None, [f"name={name}", f"train.storage_path={storage}", *overrides])
    run_loop(plan_job(cfg), world=cfg.scaling.num_workers)
    export(run_dir(cfg), out)
    return cfg


@pytest.fixture(scope="session")
def pretrained_model_dir(prepared_pretrain, tmp_path_factory):
    """A tiny model pretrained by raylm's loop (2 ranks, ZeRO-2) on the session corpus, exported.

    Its users need a base that raylm's loop wrote and `raylm export` exported, not a good model:
    12 steps."""
    root = tmp_path_factory.mktemp("pretrained")
    train_and_export("pretrain", root / "runs", root / "export", [
        f"train.datasets=[{prepared_pretrain.output}]",
        "train.global_batch_tokens=4096",  # 32 rows of 128
        "train.micro_batch_size=8",
        "train.max_steps=12",
        "train.lr=0.003",
        "train.warmup_steps=2",
        "train.log_every=6",
        "train.checkpoint_every=12",
        "scaling.num_workers=2",
        "deepspeed.zero_stage=2",
    ])  # fmt: skip
    return root / "export"


def assistant_spans(ids, carries, tok, end_id: int, answers: set[str]) -> int:
    """Check every loss-carrying span of SFT rows and return how many there are.

    ids, carries: (rows, seq) token ids and the bool mask of tokens with a label. Each span must end
    with the end-of-turn token and decode (without it) to one of ``answers``.
    """
    import numpy as np

    spans = 0
    for row_ids, row_mask in zip(ids, carries, strict=True):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row_mask.astype(int), [0]])))
        for a, b in zip(edges[::2], edges[1::2], strict=True):
            assert row_ids[b - 1] == end_id, "each answer ends with the end-of-turn token"
            assert tok.decode(row_ids[a : b - 1]) in answers
            spans += 1
    return spans
