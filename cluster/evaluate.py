"""``raylm eval`` composed: training's perplexity and scoring + serving's engine for generation.

``training.evaluate`` owns the checks, perplexity, scoring and eval.json; it takes generation as a
callable so it never imports ``serving``. Here that callable is built from the built-in engine
(continuous batching, KV cache): prompts go through the model tokenizer's chat template with the
generation prompt, decoding is greedy and stops at the eos ids of the model's generation_config
or an end-of-turn token, exactly as a chat request to ``raylm serve`` would.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from training.config import EvalConfig
from training.evaluate import EvalPlan, Generate, Messages, PromptError, evaluate, plan_eval

__all__ = ["chat_prompt_ids", "engine_generate", "engine_session", "run_eval"]


def chat_prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of the chat-templated conversation plus the assistant generation prompt.

    Rendered to text and tokenized without added specials, like the endpoint's chat route and like
    ``data prepare`` renders SFT training conversations.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def engine_generate(engine: Any, concurrency: int, progress: bool = False) -> Generate:
    """A :data:`training.evaluate.Generate` over a ``serving.engine.Engine``.

    At most ``concurrency`` sequences are in flight (threads blocking in ``generate_sync``); the
    engine batches them step by step, so this never hits its overload limit.
    """
    from tqdm import tqdm

    from data_pipelines.chat import end_of_turn_ids
    from serving.sampling import SamplingParams

    stop_ids = end_of_turn_ids(engine.tokenizer)

    def generate(conversations: list[Messages], max_new_tokens: int) -> list[str]:
        prompts = [chat_prompt_ids(engine.tokenizer, m) for m in conversations]
        for i, ids in enumerate(prompts):
            if not ids or len(ids) >= engine.max_model_len:
                raise PromptError(
                    i,
                    f"prompt has {len(ids)} tokens; the model's context is {engine.max_model_len}",
                )
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_ids)
        bar = tqdm(total=len(prompts), desc="raylm eval: generate", disable=not progress)

        def one(ids: list[int]) -> str:
            text = engine.generate_sync(ids, params).text
            bar.update(1)
            return text

        with bar, ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(one, prompts))

    return generate


@contextmanager
def engine_session(plan: EvalPlan, progress: bool = False) -> Iterator[Generate]:
    """Load the engine on ``plan``'s model dir, device and dtype; shut it down afterwards."""
    from serving.config import EngineConfig
    from serving.engine import Engine

    n = plan.cfg.batch_size
    cfg = EngineConfig(
        max_num_seqs=n,
        max_waiting=n,
        device=plan.device,
        dtype=plan.dtype,
        warmup=False,
        request_timeout_s=3600.0,  # requests wait at most one batch; this only catches a hang
    )
    engine = Engine(plan.model_dir, cfg)
    try:
        yield engine_generate(engine, n, progress)
    finally:
        engine.shutdown()


def run_eval(cfg: EvalConfig, name: str, progress: bool = False) -> dict[str, Any]:
    """Check, run and write one evaluation; returns eval.json's content.

    Raises ``training.evaluate.EvalError`` (naming the config key, file or file:line) before any
    model loads when the inputs are unusable. eval.json goes to ``training.evaluate.eval_output``.
    """
    plan = plan_eval(cfg, name)
    return evaluate(plan, lambda: engine_session(plan, progress))
