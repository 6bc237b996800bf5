"""Backend selection (`serve.engine.backend`): the built-in engine by default, vLLM by config with a
clear error where vllm cannot be imported (no GPU here), and the pure vLLM parameter mappings."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

from serving.backend import BackendUnavailable, load_backend
from serving.config import EngineConfig, ServeConfig
from serving.deployment import load_serve_config
from serving.sampling import SamplingParams
from serving.vllm_backend import (
    _logprob,
    prompt_logprobs,
    vllm_engine_kwargs,
    vllm_sampling_kwargs,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_backend_is_builtin_by_default_and_vllm_by_config():
    assert ServeConfig().engine.backend == "builtin"
    cfg = load_serve_config(overrides=["serve.engine.backend=vllm"])
    assert cfg.engine.backend == "vllm"
    with pytest.raises(ValueError, match=r"serve\.engine\.backend"):
        load_serve_config(overrides=["serve.engine.backend=tgi"])


def test_builtin_backend_is_the_engine(tiny_model_dir):
    from serving.engine import Engine

    backend = load_backend(tiny_model_dir, EngineConfig(warmup=False))
    try:
        assert isinstance(backend, Engine) and backend.is_ready() and not backend.closing
    finally:
        backend.shutdown()


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: the missing-package path cannot happen")
def test_vllm_backend_without_vllm_names_the_setting_and_the_fix(tiny_model_dir):
    with pytest.raises(BackendUnavailable) as err:
        load_backend(tiny_model_dir, EngineConfig(backend="vllm"))
    msg = str(err.value)
    assert "serve.engine.backend=vllm" in msg and "pip install vllm" in msg and "builtin" in msg


def test_sampling_params_map_onto_vllm_names():
    p = SamplingParams(max_tokens=7, temperature=0.0, top_k=0, stop=("\n",), seed=3, logprobs=2)
    kw = vllm_sampling_kwargs(p)
    assert kw["max_tokens"] == 7 and kw["temperature"] == 0.0 and kw["seed"] == 3
    assert kw["top_k"] == -1  # "off" in every vLLM version (0 is rejected by older ones)
    assert kw["stop"] == ["\n"] and kw["stop_token_ids"] is None and kw["logprobs"] == 2
    assert vllm_sampling_kwargs(SamplingParams(top_k=5, stop_token_ids=(9,)))["top_k"] == 5
    assert kw["prompt_logprobs"] is None
    # Scoring only: vLLM must sample a token (dropped by the stream) and scores the prompt.
    kw = vllm_sampling_kwargs(SamplingParams(max_tokens=0, prompt_logprobs=3))
    assert kw["max_tokens"] == 1 and kw["prompt_logprobs"] == 3


def test_engine_args_come_from_the_engine_section_and_extra_args_win(tmp_path):
    cfg = EngineConfig(
        backend="vllm",
        max_num_seqs=8,
        max_batched_tokens=1024,
        max_model_len=512,
        vllm_engine_args={"gpu_memory_utilization": 0.45, "max_num_seqs": 4},
    )
    kw = vllm_engine_kwargs("/m", cfg, None)
    assert kw["model"] == kw["tokenizer"] == "/m" and kw["load_format"] == "safetensors"
    assert (kw["max_num_batched_tokens"], kw["max_model_len"]) == (1024, 512)
    assert kw["max_num_seqs"] == 4 and kw["gpu_memory_utilization"] == 0.45
    assert kw["enable_lora"] is False
    (tmp_path / "tokenizer_config.json").write_text("{}")  # an adapter shipping its chat template
    kw = vllm_engine_kwargs("/m", cfg, str(tmp_path))
    assert kw["enable_lora"] is True and kw["tokenizer"] == str(tmp_path)


def test_vllm_logprobs_become_the_chosen_token_and_top_k_by_rank():
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731  vllm.logprobs.Logprob's fields
    entries = {5: lp(-2.0, 3), 1: lp(-0.5, 1), 2: lp(-1.0, 2)}  # sampled 5, ranked 3rd
    got = _logprob(5, entries, k=2)
    assert got.token_id == 5 and got.logprob == -2.0 and got.top == ((1, -0.5), (2, -1.0))
    assert _logprob(5, entries, k=0).top == ()


def test_vllm_prompt_logprobs_become_one_entry_per_prompt_token_with_rank():
    lp = lambda v, r: SimpleNamespace(logprob=v, rank=r)  # noqa: E731  vllm.logprobs.Logprob's fields
    entries = [None, {7: lp(-0.1, 1)}, {8: lp(-3.0, 4), 7: lp(-0.2, 1), 9: lp(-1.0, 2)}]
    got = prompt_logprobs([6, 7, 8], entries, k=1)
    assert got[0] is None and (got[1].token_id, got[1].rank, got[1].top) == (7, 1, ((7, -0.1),))
    assert (got[2].token_id, got[2].logprob, got[2].rank) == (8, -3.0, 4)
    assert got[2].top == ((7, -0.2),)
    assert prompt_logprobs([6, 7], None, k=1) is None
