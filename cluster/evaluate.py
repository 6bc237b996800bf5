"""``raylm eval`` composed: training's perplexity and scoring + serving's engine for generation +
lm-evaluation-harness for its tasks.

``training.evaluate`` owns the checks, perplexity, scoring and eval.json; it takes generation as a
callable so it never imports ``serving``. Here that callable is built from the built-in engine
(continuous batching, KV cache): prompts go through the model tokenizer's chat template with the
generation prompt, decoding is greedy and stops at the eos ids of the model's generation_config
or an end-of-turn token, exactly as a chat request to ``raylm serve`` would.

With ``eval.distributed`` the work spreads over the Ray cluster: perplexity through a Ray Data
actor pool over each dataset's validation rows (the same per-batch loss as in process, summed),
and generation through ``raylm generate``'s job (engine actors, input order kept, greedy).

``eval.harness_tasks`` run through lm-eval (an optional extra, imported only when asked for): its
``hf`` model on ``eval.model`` in this process, or its ``local-completions`` model against a running
endpoint (``eval.harness_endpoint``), which scores through ``/v1/completions`` with ``echo``.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import EvalConfig
from training.evaluate import (
    EvalError,
    EvalPlan,
    Generate,
    Messages,
    PromptError,
    evaluate,
    plan_eval,
)

__all__ = [
    "HarnessPlan",
    "chat_prompt_ids",
    "engine_generate",
    "engine_session",
    "plan_harness",
    "ray_generate_session",
    "ray_perplexity",
    "require_lm_eval",
    "run_eval",
    "run_harness",
]


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


# ---------------------------------------------------------------- lm-evaluation-harness


def require_lm_eval() -> None:
    """EvalError naming eval.harness_tasks and the install command when lm-eval is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError(
            "eval.harness_tasks: needs lm-evaluation-harness, which is not installed; "
            "pip install raylm[eval]"
        ) from None


@dataclass
class HarnessPlan:
    """How the lm-eval tasks run: lm-eval's model name and arguments, and the resolved tasks."""

    model: str  # "hf" (in-process) | "local-completions" (eval.harness_endpoint)
    model_args: dict[str, Any]
    tasks: list[str]
    task_manager: Any  # lm_eval.tasks.TaskManager over eval.harness_include_path (+ built-ins)
    limit: int | None
    batch_size: int
    device: str


def _task_manager(cfg: EvalConfig) -> Any:
    """lm-eval's task index; lm-eval's own tasks (~15k YAMLs, seconds) only when needed."""
    from lm_eval.tasks import TaskManager

    for i, path in enumerate(cfg.harness_include_path):
        if not Path(path).is_dir():
            raise EvalError(f"eval.harness_include_path[{i}]: {path}: no such directory")
    if cfg.harness_include_path:
        local = TaskManager(include_path=cfg.harness_include_path, include_defaults=False)
        if all(local.match_tasks([t]) for t in cfg.harness_tasks):
            return local
    tm = TaskManager(include_path=cfg.harness_include_path or None)
    for i, task in enumerate(cfg.harness_tasks):
        if not tm.match_tasks([task]):
            where = " or eval.harness_include_path" if cfg.harness_include_path else ""
            raise EvalError(f"eval.harness_tasks[{i}]: {task!r}: no such lm-eval task{where}")
    return tm


def _endpoint_model(cfg: EvalConfig) -> str:
    """The served model the endpoint scores with (checked against its /v1/models)."""
    import urllib.request

    url = cfg.harness_endpoint.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise EvalError(f"eval.harness_endpoint: {url}: not an http(s) URL (e.g. .../v1)")
    key = os.environ.get("OPENAI_API_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/models", headers=headers),
                                    timeout=30) as resp:  # fmt: skip
            served = [m["id"] for m in json.loads(resp.read())["data"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:  # URLError, HTTPError are OSErrors
        raise EvalError(
            f"eval.harness_endpoint: {url}/models did not list models ({exc})"
        ) from None
    name = cfg.harness_endpoint_model or (served[0] if served else "")
    if name not in served:
        raise EvalError(f"eval.harness_endpoint_model: {name!r} is not served at {url} "
                        f"(served: {', '.join(served) or 'none'})")  # fmt: skip
    return name


def _context_length(model_dir: Path) -> int:
    """The model's context from config.json (lm-eval's API models assume 2048 otherwise)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 2048)


def plan_harness(plan: EvalPlan) -> HarnessPlan | None:
    """Check eval.harness_* (task names, dirs, endpoint) before any model loads; None: no tasks."""
    cfg = plan.cfg
    if not cfg.harness_tasks:
        return None
    require_lm_eval()
    tm = _task_manager(cfg)
    if cfg.harness_endpoint:
        model = "local-completions"
        args: dict[str, Any] = {
            "model": _endpoint_model(cfg),
            "base_url": f"{cfg.harness_endpoint.rstrip('/')}/completions",
            # The export's tokenizer splits context and continuation, as the endpoint does.
            "tokenizer_backend": "huggingface",
            "tokenizer": str(plan.model_dir),
            "max_length": _context_length(plan.model_dir),
            "num_concurrent": 2,  # one request in flight while the next is built
        }
    else:
        model, args = "hf", {"pretrained": str(plan.model_dir), "dtype": plan.dtype}
    limit = cfg.harness_limit or None
    return HarnessPlan(model, args, list(cfg.harness_tasks), tm, limit, cfg.batch_size, plan.device)


def _harness_metrics(values: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> (metrics, stderrs)."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for key, value in values.items():
        if "," not in key or isinstance(value, str) or value is None:
            continue  # alias, name, sample_len; "N/A" stderrs
        metric, filt = key.split(",", 1)
        name = metric.removesuffix("_stderr")
        name = name if filt == "none" else f"{name} ({filt})"
        (stderr if metric.endswith("_stderr") else metrics)[name] = float(value)
    return metrics, stderr


def run_harness(hp: HarnessPlan) -> dict[str, Any]:
    """Run the lm-eval tasks; eval.json's "harness" entry (metrics on lm-eval's scale)."""
    import lm_eval

    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=hp.model,
        model_args=hp.model_args,
        tasks=hp.tasks,
        task_manager=hp.task_manager,
        limit=hp.limit,
        batch_size=hp.batch_size,
        device=hp.device,
        log_samples=False,
    )
    counts = out.get("n-samples", {})
    tasks = []
    for task, values in out["results"].items():
        metrics, stderr = _harness_metrics(values)
        n = counts.get(task, {}).get("effective", "")
        tasks.append({"task": task, "n": n, "metrics": metrics, "stderr": stderr,
                      "version": out.get("versions", {}).get(task)})  # fmt: skip
    return {
        "lm_eval": lm_eval.__version__,
        "model": hp.model,
        "endpoint": hp.model_args.get("base_url"),
        "limit": hp.limit,
        "tasks": tasks,
        "seconds": round(time.perf_counter() - t0, 3),
    }


# ---------------------------------------------------------------- eval.distributed


class PerplexityActor:
    """Ray Data actor: one model copy; each call returns its rows' loss sum and loss tokens."""

    def __init__(
        self, model_dir: str, dtype: str, device: str, pad_id: int | None, vocab: int, where: str
    ):
        from training.evaluate import load_eval_model

        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.model = load_eval_model(model_dir, dtype, device)
        self.pad_id, self.vocab, self.device, self.where = pad_id, vocab, device, where

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from training.evaluate import batch_loss

        rows = {
            c: np.stack(batch[c]) for c in ("input_ids", "position_ids", "labels") if c in batch
        }
        total, count = batch_loss(
            self.model, rows, self.pad_id, self.vocab, self.device, self.where
        )
        n = len(rows["input_ids"])
        return {"loss_sum": np.array([total]), "tokens": np.array([count]), "rows": np.array([n])}


def ray_perplexity(plan: EvalPlan) -> list[dict[str, Any]]:
    """eval.json's perplexity entries, each dataset's validation rows scored by ``eval.actors``
    model actors (``eval.perplexity_rows`` first rows in file order; sums do not depend on how
    the rows are split)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    kept, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:  # in file order, so eval.perplexity_rows takes the rows the in-process path takes
        return [_dataset_perplexity_on_ray(plan, data) for data in plan.datasets]
    finally:
        ctx.execution_options.preserve_order = kept


def _dataset_perplexity_on_ray(plan: EvalPlan, data: Any) -> dict[str, Any]:
    """One dataset's perplexity entry: loss sums per batch from the actor pool, added up."""
    import ray
    from ray.data import ActorPoolStrategy

    from data_pipelines.actor_pool import restarts_as_remote_arg
    from training.evaluate import perplexity_row

    t0 = time.perf_counter()
    info = data.info
    cols = ["input_ids", "position_ids"] + (["labels"] if info.has_labels else [])
    ds = ray.data.read_parquet(info.files["validation"]).select_columns(cols)
    if plan.cfg.perplexity_rows:
        ds = ds.limit(plan.cfg.perplexity_rows)
    # blocks of one batch each, so every actor gets work whatever the file count
    ds = ds.repartition(target_num_rows_per_block=plan.cfg.batch_size)
    ctor = {"model_dir": str(plan.model_dir), "dtype": plan.dtype, "device": plan.device,
            "pad_id": info.pad_token_id, "vocab": plan.vocab_size,
            "where": f"{data.key}: {data.path}"}  # fmt: skip
    with restarts_as_remote_arg():
        sums = ds.map_batches(PerplexityActor, fn_constructor_kwargs=ctor,
                              batch_size=plan.cfg.batch_size, num_cpus=plan.cfg.actor_cpus,
                              compute=ActorPoolStrategy(size=plan.cfg.actors),
                              max_restarts=0)  # fmt: skip
    parts = sums.take_all()
    total = float(sum(p["loss_sum"] for p in parts))
    count, rows = int(sum(p["tokens"] for p in parts)), int(sum(p["rows"] for p in parts))
    return perplexity_row(data, total, count, rows, time.perf_counter() - t0)


@contextmanager
def ray_generate_session(plan: EvalPlan, progress: bool = False) -> Iterator[Generate]:
    """A :data:`training.evaluate.Generate` that runs each call as a ``raylm generate`` job on the
    connected Ray: the conversations as chat rows, greedy, in input order; a row the job reports
    as an error (a prompt longer than the context) fails the eval naming its index."""
    import tempfile

    import pyarrow.parquet as pq

    from serving.batch_job import generate
    from serving.config import GenerateConfig, GenerateSampling

    with tempfile.TemporaryDirectory(prefix="raylm_eval_") as tmp:
        calls = itertools.count()

        def run(conversations: list[Messages], max_new_tokens: int) -> list[str]:
            k = next(calls)
            prompts = Path(tmp) / f"call{k}.jsonl"
            prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
            cfg = GenerateConfig(
                inputs=[str(prompts)], output=str(Path(tmp) / f"out{k}"), model=str(plan.model_dir),
                sampling=GenerateSampling(max_tokens=max_new_tokens, temperature=0.0),
                num_actors=plan.cfg.actors, actor_cpus=plan.cfg.actor_cpus,
                batch_size=plan.cfg.batch_size, row_sampling=False,
            )  # fmt: skip
            result = generate(cfg, progress=progress)
            files = sorted((result.output / "results").glob("*.parquet"))
            table = pq.read_table(files, columns=["generated_text", "error"]).to_pylist()
            for i, row in enumerate(table):
                if row["error"]:
                    raise PromptError(i, row["error"])
            return [row["generated_text"] for row in table]

        yield run


def run_eval(cfg: EvalConfig, name: str, progress: bool = False) -> dict[str, Any]:
    """Check, run and write one evaluation; returns eval.json's content.

    Raises ``training.evaluate.EvalError`` (naming the config key, file or file:line) before any
    model loads when the inputs are unusable (lm-eval missing for eval.harness_tasks included).
    eval.json goes to ``training.evaluate.eval_output``.
    """
    if cfg.harness_tasks:
        require_lm_eval()
    plan = plan_eval(cfg, name)
    hp = plan_harness(plan)
    harness = (lambda: run_harness(hp)) if hp is not None else None
    if cfg.distributed:
        return evaluate(plan, lambda: ray_generate_session(plan, progress), harness,
                        perplexity_fn=ray_perplexity, single_call=True)  # fmt: skip
    return evaluate(plan, lambda: engine_session(plan, progress), harness)
