"""``raylm eval``'s core: held-out perplexity on prepared parquet and generation-scored tasks.

Phases: :func:`plan_eval` (every input check, before any model loads) -> :func:`run_perplexity`
(in-process ``transformers`` forward passes over the validation split) and the preference pairs'
log-probs (one model load for both) -> :func:`run_tasks` (prompts through a ``generate``
callable, scored by ``training.scoring``; greedy answers to the preference prompts) -> the lm-eval
tasks (a :data:`Harness` callable) -> ``eval.json``.

No Ray and no ``serving`` import: generation and lm-eval come in as callables. The CLI layer
(``cluster.evaluate``) builds them from the serving engine and lm-evaluation-harness; any
function with the :data:`Generate` signature works (a ``transformers.generate`` loop, an HTTP
client).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from training.batch import forward_packed, loss_targets, token_loss
from training.config import EvalConfig
from training.data import DatasetInfo, dataset_info
from training.errors import TrainConfigError
from training.scoring import TASK_METRICS, example_score, score_task

__all__ = [
    "EVAL_NAME",
    "EvalError",
    "EvalPlan",
    "Generate",
    "GenerateSession",
    "Harness",
    "PairRecord",
    "PerplexityData",
    "PromptError",
    "TaskRecord",
    "batch_loss",
    "compare_table",
    "eval_output",
    "evaluate",
    "flat_metrics",
    "format_table",
    "load_eval_model",
    "load_report",
    "one_pass",
    "perplexity_row",
    "plan_eval",
    "read_preference_file",
    "read_task_file",
    "run_perplexity",
    "run_preference_generation",
    "run_tasks",
]

EVAL_NAME = "eval.json"

Messages = list[dict[str, str]]
# (conversations, max_new_tokens) -> one completion per conversation, the assistant turn's text
# without the end-of-turn token. Greedy, so a score is a function of the model and the prompts.
Generate = Callable[[list[Messages], int], list[str]]
# Opens whatever generates (loads an engine) and closes it afterwards.
GenerateSession = Callable[[], AbstractContextManager[Generate]]
# Runs the lm-evaluation-harness tasks; returns eval.json's "harness" entry, whose "tasks" are
# {"task", "n", "metrics": {name: value}} (lm-eval's own scale, not points).
Harness = Callable[[], dict[str, Any]]
# EvalPlan -> eval.json's perplexity entries, one per eval.perplexity_data dataset.
Perplexity = Callable[["EvalPlan"], list[dict[str, Any]]]


class EvalError(ValueError):
    """Input ``raylm eval`` cannot use; the message names the config key, file or file:line."""


class PromptError(EvalError):
    """A generate callable refusing prompt ``index`` of its batch (e.g. longer than the context)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


@dataclass(frozen=True)
class TaskRecord:
    source: str  # "file:line", for errors and samples
    task: str
    messages: Messages
    reference: str


@dataclass(frozen=True)
class PerplexityData:
    key: str  # eval.perplexity_data[i]
    path: str  # as configured: the label in tables and comparisons
    info: DatasetInfo


@dataclass(frozen=True)
class PairRecord:
    source: str  # "file:line"
    prompt: Messages
    chosen: str
    rejected: str


@dataclass
class EvalPlan:
    """Everything checked and resolved; running it cannot fail on configuration."""

    cfg: EvalConfig
    name: str
    model_dir: Path
    output: Path
    device: str  # "cpu" | "cuda"
    dtype: str  # "float32" | "bfloat16"
    vocab_size: int
    datasets: list[PerplexityData] = field(default_factory=list)
    tasks: dict[str, list[TaskRecord]] = field(default_factory=dict)  # task -> records, file order
    # eval.preference_data path -> its pairs, file order
    preference: dict[str, list[PairRecord]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def eval_output(cfg: EvalConfig, name: str) -> Path:
    """Where eval.json goes: ``eval.output``, else ``runs/eval/<name>``."""
    return Path(cfg.output) if cfg.output else Path("runs/eval") / name


# ---------------------------------------------------------------- plan (all checks)


def plan_eval(cfg: EvalConfig, name: str) -> EvalPlan:
    """Check the model dir, task files and datasets; raise :class:`EvalError` naming the key."""
    model_dir = _check_model_dir(cfg.model)
    if not (cfg.perplexity_data or cfg.tasks or cfg.harness_tasks or cfg.preference_data):
        raise EvalError(
            "eval: nothing to evaluate; set eval.perplexity_data, eval.tasks, "
            "eval.preference_data and/or eval.harness_tasks"
        )
    device, dtype = _pick_device(cfg)
    tasks = _read_tasks(cfg.tasks, cfg.limit_per_task)
    pairs = {
        path: read_preference_file(path, f"eval.preference_data[{i}]")[: cfg.limit_per_task or None]
        for i, path in enumerate(cfg.preference_data)
    }
    model_tok = _load_tokenizer(model_dir, "eval.model")
    if (tasks or pairs) and not getattr(model_tok, "chat_template", None):
        key = "eval.tasks" if tasks else "eval.preference_data"
        raise EvalError(
            f"eval.model: {cfg.model}: its tokenizer has no chat template; {key} prompts "
            "are chat messages (export the model with its tokenizer's template)"
        )
    vocab = _model_vocab(model_dir, model_tok)
    plan = EvalPlan(cfg, name, model_dir, eval_output(cfg, name), device, dtype, vocab, tasks=tasks,
                    preference=pairs)  # fmt: skip
    for i, path in enumerate(cfg.perplexity_data):
        key = f"eval.perplexity_data[{i}]"
        try:
            info = dataset_info(path, key=key)
        except TrainConfigError as exc:
            raise EvalError(str(exc)) from None
        if info.rows["validation"] <= 0 or not info.files["validation"]:
            raise EvalError(f"{key}: {path} has no validation rows (data.validation_fraction 0?)")
        warning = _check_tokenizer(key, path, info, vocab, model_tok)
        if warning:
            plan.warnings.append(warning)
        plan.datasets.append(PerplexityData(key, path, info))
    return plan


def _check_model_dir(path: str) -> Path:
    if not path:
        raise EvalError(
            "eval.model: not set; give the model dir to evaluate (a `raylm export` dir)"
        )
    p = Path(path)
    if not p.is_dir():
        raise EvalError(f"eval.model: {path}: no such directory")
    if not (p / "config.json").is_file():
        hint = (
            " (a LoRA adapter dir? evaluate the merged export)"
            if (p / "adapter_config.json").is_file()
            else ""
        )
        raise EvalError(f"eval.model: {path}: not a Hugging Face model dir (no config.json){hint}")
    if not any(p.glob("*.safetensors")):
        raise EvalError(
            f"eval.model: {path}: no *.safetensors weights (raylm loads weights only from safetensors)"
        )
    return p


def _model_vocab(model_dir: Path, model_tok: Any) -> int:
    """Embedding rows from config.json (may exceed the tokenizer's length), else the tokenizer's."""
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvalError(
            f"eval.model: {model_dir / 'config.json'}: not valid JSON ({exc})"
        ) from None
    vocab = config.get("vocab_size") if isinstance(config, dict) else None
    return int(vocab) if isinstance(vocab, int) else len(model_tok)


def _pick_device(cfg: EvalConfig) -> tuple[str, str]:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("eval.device: cuda, but torch sees no CUDA device")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = "cuda" if use_cuda else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    return device, dtype


def _load_tokenizer(path: Path, key: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # a missing or corrupt tokenizer file: say which dir, not a traceback
        raise EvalError(f"{key}: {path}: cannot load its tokenizer ({exc})") from None


def _check_tokenizer(key: str, path: str, info: DatasetInfo, vocab: int, model_tok: Any) -> str:
    """Refuse data tokenized with another vocabulary (its perplexity would mean nothing).

    Returns a warning when the data's tokenizer is gone and only token ids can be range-checked.
    """
    tok_dir = Path(info.tokenizer_path)
    if not info.tokenizer_path or not (tok_dir / "tokenizer_config.json").is_file():
        return (
            f"{key}: {path}: its tokenizer ({info.tokenizer_path or 'unrecorded'}) is not on this "
            "machine; only token ids were checked against the model's vocab_size"
        )
    data_tok = _load_tokenizer(tok_dir, key)
    if len(data_tok) > vocab:
        raise EvalError(
            f"{key}: {path} was tokenized with {tok_dir} ({len(data_tok)} tokens), more than the "
            f"model's vocab_size {vocab} (eval.model); prepare it with the model's tokenizer"
        )
    model_vocab = model_tok.get_vocab()
    differ = [t for t, i in data_tok.get_vocab().items() if model_vocab.get(t) != i]
    if differ:
        raise EvalError(
            f"{key}: {path} was tokenized with {tok_dir}, whose vocabulary differs from the "
            f"model's tokenizer ({len(differ)} tokens map elsewhere, e.g. {differ[0]!r}); "
            "prepare it with the model's tokenizer"
        )
    return ""


# ---------------------------------------------------------------- task files


def read_task_file(path: str, key: str) -> list[TaskRecord]:
    """All records of one jsonl task file; errors name ``key`` or ``path:line``."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{key}: {path}: no such file")
    out = []
    try:
        with p.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if line.strip():
                    out.append(_task_record(line, f"{path}:{line_no}"))
    except UnicodeDecodeError:
        raise EvalError(f"{key}: {path}: not UTF-8 text") from None
    if not out:
        raise EvalError(f"{key}: {path}: no records")
    return out


def _task_record(line: str, where: str) -> TaskRecord:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvalError(f"{where}: invalid JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise EvalError(f"{where}: expected a JSON object")
    for name in ("task", "messages", "reference"):
        if name not in rec:
            raise EvalError(f"{where}: missing '{name}'")
    if rec["task"] not in TASK_METRICS:
        known = ", ".join(sorted(TASK_METRICS))
        raise EvalError(f"{where}: unknown task {rec['task']!r} (known: {known})")
    if not isinstance(rec["reference"], str):
        raise EvalError(f"{where}: 'reference' must be a string")
    msgs = rec["messages"]
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
    )
    if not ok:
        raise EvalError(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} strings"
        )
    if msgs[-1]["role"] == "assistant":
        raise EvalError(f"{where}: the last message is the assistant's; the model writes that turn")
    clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
    return TaskRecord(where, rec["task"], clean, rec["reference"])


def read_preference_file(path: str, key: str) -> list[PairRecord]:
    """All pairs of one jsonl file, in the shapes ``data prepare`` reads (``split_preference``);
    errors name ``key`` or ``path:line`` and the reason."""
    from data_pipelines.formats import RecordProblem
    from data_pipelines.preference import split_preference

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"{key}: {path}: no such file")
    out = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise EvalError(f"{key}: {path}: not UTF-8 text") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            pair = split_preference(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EvalError(f"{where}: invalid JSON ({exc.msg})") from None
        except RecordProblem as exc:
            raise EvalError(f"{where}: {exc.reason}: {exc.detail}") from None
        out.append(PairRecord(where, pair.prompt, pair.chosen, pair.rejected))
    if not out:
        raise EvalError(f"{key}: {path}: no records")
    return out


def _read_tasks(paths: list[str], limit: int) -> dict[str, list[TaskRecord]]:
    """Records grouped by task (file order), at most ``limit`` per task (0: all)."""
    by_task: dict[str, list[TaskRecord]] = {}
    for i, path in enumerate(paths):
        for rec in read_task_file(path, f"eval.tasks[{i}]"):
            by_task.setdefault(rec.task, []).append(rec)
    return {t: recs[:limit] if limit else recs for t, recs in by_task.items()}


# ---------------------------------------------------------------- perplexity


def load_eval_model(model_dir: str | Path, dtype: str, device: str) -> Any:
    """An exported model (safetensors), in eval mode on ``device``: sdpa where the family has it.
    Packed rows need no mask (``forward_packed`` separates documents by position_ids)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(use_safetensors=True, dtype=getattr(torch, dtype))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), attn_implementation="sdpa", **kwargs
        )
    except ValueError:  # the architecture has no sdpa kernel (Gemma 2: soft-capping)
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), attn_implementation="eager", **kwargs
        )
    return model.to(device).eval()


def _fixed_lists(column: Any, seq_len: int) -> np.ndarray:
    """list<int32> column of exactly seq_len per row -> (rows, seq_len) int64 (flat values reshaped)."""
    flat = column.combine_chunks().flatten().to_numpy().astype(np.int64)
    return flat.reshape(-1, seq_len)


def _validation_batches(
    info: DatasetInfo, batch_size: int, max_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """(batch, seq_len) int64 arrays of the validation split, file by file (one file in memory)."""
    left = max_rows or math.inf
    for f in info.files["validation"]:
        names = pq.read_schema(f).names
        cols = [c for c in ("input_ids", "position_ids", "labels") if c in names]
        table = pq.read_table(f, columns=cols)
        arrays = {c: _fixed_lists(table[c], info.seq_len) for c in cols}
        rows = len(table) if left == math.inf else min(len(table), int(left))
        for start in range(0, rows, batch_size):
            stop = min(start + batch_size, rows)
            yield {c: a[start:stop] for c, a in arrays.items()}
        left -= rows
        if left <= 0:
            return


@torch.inference_mode()
def _dataset_perplexity(model: Any, data: PerplexityData, plan: EvalPlan) -> dict[str, Any]:
    """Summed next-token loss over every loss-bearing token, then exp(sum / count)."""
    t0 = time.perf_counter()
    info = data.info
    total, count, rows = 0.0, 0, 0
    for batch in _validation_batches(info, plan.cfg.batch_size, plan.cfg.perplexity_rows):
        s, c = batch_loss(model, batch, info.pad_token_id, plan.vocab_size, plan.device,
                          f"{data.key}: {data.path}")  # fmt: skip
        total, count, rows = total + s, count + c, rows + len(batch["input_ids"])
    return perplexity_row(data, total, count, rows, time.perf_counter() - t0)


@torch.inference_mode()
def batch_loss(
    model: Any,
    batch: dict[str, np.ndarray],
    pad_id: int | None,
    vocab: int,
    device: str,
    where: str,
) -> tuple[float, int]:
    """(summed next-token loss, loss tokens) of one batch of prepared rows ((batch, seq) arrays);
    ``pad_id``: the dataset manifest's pad token, None when it has none."""
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.int64)).to(device) for k, v in batch.items()}
    top = int(t["input_ids"].max())
    if top >= vocab:
        raise EvalError(f"{where}: token id {top} is outside the model's vocab_size {vocab} "
                        "(eval.model)")  # fmt: skip
    pad = pad_id if pad_id is not None else -1
    targets = loss_targets(t["input_ids"], t["position_ids"], pad, t.get("labels"))
    s, c = token_loss(forward_packed(model, t["input_ids"], t["position_ids"]), targets)
    return float(s), int(c)  # host sync per batch: fine for eval, keeps the sum in float64


def perplexity_row(
    data: PerplexityData, total: float, count: int, rows: int, seconds: float
) -> dict[str, Any]:
    """eval.json's perplexity entry of one dataset from its loss sum and loss-token count."""
    if count == 0:
        raise EvalError(f"{data.key}: {data.path}: no loss-bearing tokens in the validation split")
    loss = total / count
    return {
        "key": data.key,
        "path": data.path,
        "rows": rows,
        "tokens": count,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "seconds": round(seconds, 3),
    }


def run_perplexity(plan: EvalPlan) -> list[dict[str, Any]]:
    """Perplexity per dataset; the model is loaded once and freed before generation starts."""
    return _forward_scores(dataclasses.replace(plan, preference={}))[0]


def _forward_scores(
    plan: EvalPlan, perplexity: Perplexity | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(perplexity per dataset, preference scores per file) with one model load, freed before
    generation starts. ``perplexity``: computes the datasets' perplexity elsewhere (a Ray Data
    job) instead of with this process's model."""
    ppl = perplexity(plan) if perplexity is not None and plan.datasets else None
    if not plan.preference and (ppl is not None or not plan.datasets):
        return ppl or [], []  # nothing left for a model in this process
    model = load_eval_model(plan.model_dir, plan.dtype, plan.device)
    try:
        if ppl is None:
            ppl = [_dataset_perplexity(model, d, plan) for d in plan.datasets]
        pairs = []
        if plan.preference:
            tok = _load_tokenizer(plan.model_dir, "eval.model")
            pairs = [_pair_logps(model, tok, path, recs, plan)
                     for path, recs in plan.preference.items()]  # fmt: skip
        return ppl, pairs
    finally:
        del model
        if plan.device == "cuda":
            torch.cuda.empty_cache()


def _encode_pair(tok: Any, rec: PairRecord, max_len: int) -> dict[str, np.ndarray]:
    """One pair as a preference row: each side prompt + answer through the chat template,
    labels on the answer and its end-of-turn token (as ``data prepare`` labels it)."""
    from jinja2.exceptions import TemplateError

    from data_pipelines.errors import DataError
    from data_pipelines.formats import RecordProblem
    from data_pipelines.tokenize import encode_conversation

    row: dict[str, np.ndarray] = {}
    for side, answer in (("chosen", rec.chosen), ("rejected", rec.rejected)):
        msgs = [*rec.prompt, {"role": "assistant", "content": answer}]
        try:
            ids, labels = encode_conversation(tok, msgs, last_only=True)
        except (RecordProblem, DataError, TemplateError) as exc:
            raise EvalError(
                f"{rec.source}: the model's chat template cannot render it ({exc})"
            ) from None
        if len(ids) > max_len:
            raise EvalError(f"{rec.source}: the {side} side has {len(ids)} tokens; the model's "
                            f"context is {max_len}")  # fmt: skip
        row[f"{side}_input_ids"], row[f"{side}_labels"] = ids, labels
    return row


@torch.inference_mode()
def _pair_logps(
    model: Any, tok: Any, path: str, records: list[PairRecord], plan: EvalPlan
) -> dict[str, Any]:
    """Summed log-prob of each pair's chosen and rejected answer (its end-of-turn token
    included, as DPO scores it); win_rate: the share (points) where chosen is higher, margin:
    the mean difference in nats."""
    from training.dpo import collate_pairs, reference_logps

    t0 = time.perf_counter()
    max_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
    rows = [_encode_pair(tok, r, max_len) for r in records]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    chosen, rejected = [], []
    for start in range(0, len(rows), plan.cfg.batch_size):
        part = rows[start : start + plan.cfg.batch_size]
        batch = {k: [r[k] for r in part] for k in part[0]}
        cols = collate_pairs(batch, int(pad or 0))
        t = {k: torch.from_numpy(v).to(plan.device) for k, v in cols.items()}
        c, r = reference_logps(model, t)
        chosen += c.double().tolist()
        rejected += r.double().tolist()
    diff = np.asarray(chosen) - np.asarray(rejected)
    samples = [{"source": rec.source, "prompt": rec.prompt[-1]["content"], "chosen": rec.chosen,
                "rejected": rec.rejected, "logp_chosen": c, "logp_rejected": r}
               for rec, c, r in list(zip(records, chosen, rejected, strict=True))[: plan.cfg.samples]]  # fmt: skip
    return {
        "path": path,
        "n": len(records),
        "metrics": {"win_rate": 100.0 * float((diff > 0).mean()), "margin": float(diff.mean())},
        "seconds": round(time.perf_counter() - t0, 3),
        "samples": samples,
    }


# ---------------------------------------------------------------- generation tasks


def _generate_checked(generate: Generate, records: list[TaskRecord], max_new: int) -> list[str]:
    try:
        preds = generate([r.messages for r in records], max_new)
    except PromptError as exc:
        raise EvalError(f"{records[exc.index].source}: {exc}") from None
    if len(preds) != len(records):
        raise RuntimeError(f"generate returned {len(preds)} completions for {len(records)} prompts")
    return preds


def _preference_prompts(records: list[PairRecord]) -> list[TaskRecord]:
    """A preference file's prompts as generation records (no reference: scored against both
    answers)."""
    return [TaskRecord(r.source, "preference", r.prompt, "") for r in records]


def one_pass(generate: Generate, plan: EvalPlan) -> Generate:
    """Call ``generate`` once, now, on every prompt that :func:`run_tasks` and then
    :func:`run_preference_generation` will ask for (all with ``eval.max_new_tokens``); the
    returned Generate hands its answers out to those calls, in their order. For a generate that
    starts work per call (``eval.distributed``: a ``raylm generate`` job whose actors each load
    the model) that is one job for the whole eval instead of one per task and preference file."""
    records = [r for recs in plan.tasks.values() for r in recs]
    records += [r for recs in plan.preference.values() for r in _preference_prompts(recs)]
    answers = _generate_checked(generate, records, plan.cfg.max_new_tokens) if records else []
    given = 0

    def replay(conversations: list[Messages], max_new_tokens: int) -> list[str]:
        nonlocal given
        start, given = given, given + len(conversations)
        asked = [r.messages for r in records[start:given]]
        if max_new_tokens != plan.cfg.max_new_tokens or asked != conversations:
            raise RuntimeError("one_pass: asked for prompts other than the planned ones, in order")
        return answers[start:given]

    return replay


def _normalized(text: str) -> str:
    return " ".join(text.split())


def run_preference_generation(
    plan: EvalPlan, generate: Generate, scores: list[dict[str, Any]]
) -> None:
    """Greedy answers to each preference file's prompts: ``greedy_chosen`` / ``greedy_rejected``
    (points) are the shares equal (whitespace aside) to the chosen / rejected answer; added to
    ``scores`` (:func:`_pair_logps`'s entries, same order)."""
    for entry, records in zip(scores, plan.preference.values(), strict=True):
        t0 = time.perf_counter()
        preds = [_normalized(p) for p in _generate_checked(
            generate, _preference_prompts(records), plan.cfg.max_new_tokens)]  # fmt: skip
        chosen = [p == _normalized(r.chosen) for p, r in zip(preds, records, strict=True)]
        rejected = [p == _normalized(r.rejected) for p, r in zip(preds, records, strict=True)]
        entry["metrics"]["greedy_chosen"] = 100.0 * float(np.mean(chosen))
        entry["metrics"]["greedy_rejected"] = 100.0 * float(np.mean(rejected))
        for sample, pred in zip(entry["samples"], preds, strict=False):
            sample["prediction"] = pred
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - t0, 3)


def run_tasks(plan: EvalPlan, generate: Generate) -> list[dict[str, Any]]:
    """Generate and score every task; each entry has metrics (points), n and sample predictions."""
    out = []
    for task, records in plan.tasks.items():
        t0 = time.perf_counter()
        preds = _generate_checked(generate, records, plan.cfg.max_new_tokens)
        refs = [r.reference for r in records]
        samples = [
            {
                "source": r.source,
                "prompt": r.messages[-1]["content"],
                "reference": r.reference,
                "prediction": p,
                "scores": example_score(task, p, r.reference),
            }
            for r, p in list(zip(records, preds, strict=True))[: plan.cfg.samples]
        ]
        out.append({
            "task": task,
            "n": len(records),
            "metrics": score_task(task, preds, refs),
            "files": sorted({r.source.rsplit(":", 1)[0] for r in records}),
            "seconds": round(time.perf_counter() - t0, 3),
            "samples": samples,
        })  # fmt: skip
    return out


# ---------------------------------------------------------------- the whole run


def evaluate(
    plan: EvalPlan,
    session: GenerateSession | None = None,
    harness: Harness | None = None,
    perplexity_fn: Perplexity | None = None,
    single_call: bool = False,
) -> dict[str, Any]:
    """Run perplexity (``perplexity_fn`` when given, else in this process), the tasks through
    ``session()``, then ``harness()``; write and return eval.json's content. ``single_call``:
    the session's generate is called once for every task and preference prompt
    (:func:`one_pass`); each task's ``seconds`` is then its scoring alone."""
    t0 = time.perf_counter()
    perplexity, preference = _forward_scores(plan, perplexity_fn)
    t1 = time.perf_counter()
    tasks: list[dict[str, Any]] = []
    load_s = 0.0
    if plan.tasks or (preference and session is not None):
        if session is None:
            raise ValueError("eval.tasks is set but no generate session was given")
        with session() as generate:
            load_s = time.perf_counter() - t1
            if single_call:
                generate = one_pass(generate, plan)
            tasks = run_tasks(plan, generate)
            run_preference_generation(plan, generate, preference)
    t2 = time.perf_counter()
    harness_report = harness() if harness is not None else None
    t3 = time.perf_counter()
    report = {
        "name": plan.name,
        "model": str(plan.model_dir.resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": plan.device,
        "dtype": plan.dtype,
        "perplexity": perplexity,
        "tasks": tasks,
        "preference": preference,
        "warnings": plan.warnings,
        "timings": {
            "perplexity_s": round(t1 - t0, 3),
            "generator_load_s": round(load_s, 3),
            "generation_s": round(t2 - t1 - load_s, 3),
            "harness_s": round(t3 - t2, 3),
            "total_s": round(t3 - t0, 3),
        },
        "config": plan.cfg.model_dump(mode="json"),
    }
    if harness_report is not None:
        report["harness"] = harness_report
    _write_json(plan.output / EVAL_NAME, report)
    return report


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a report


# ---------------------------------------------------------------- tables


def flat_metrics(report: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """Metric label -> (value, count) for tables: perplexity per dataset, task metrics in points,
    lm-eval metrics on lm-eval's scale (labelled ``lm-eval TASK METRIC``)."""
    out: dict[str, tuple[float, str]] = {}
    for p in report.get("perplexity", []):
        out[f"perplexity {p['path']}"] = (float(p["perplexity"]), f"{p['tokens']} tok")
    for t in report.get("tasks", []):
        for name, value in t["metrics"].items():
            out[f"{t['task']} {name}"] = (float(value), str(t["n"]))
    for p in report.get("preference", []):
        for name, value in p["metrics"].items():
            out[f"preference {Path(p['path']).stem} {name}"] = (float(value), str(p["n"]))
    for t in report.get("harness", {}).get("tasks", []):
        for name, value in t["metrics"].items():
            out[f"lm-eval {t['task']} {name}"] = (float(value), str(t["n"]))
    return out


def format_table(report: dict[str, Any]) -> str:
    """A short text table of one report."""
    rows = flat_metrics(report)
    width = max([len(k) for k in rows] + [6])
    lines = [f"model {report['model']}", f"{'metric':<{width}}  {'value':>10}  {'n':>10}"]
    lines += [f"{k:<{width}}  {v:>10.3f}  {n:>10}" for k, (v, n) in rows.items()]
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def load_report(path: str | Path) -> dict[str, Any]:
    """An eval.json, given as the file or a directory holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / EVAL_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {EVAL_NAME} (run `raylm eval` first)")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(report, dict) or not {"model", "perplexity", "tasks"} <= report.keys():
        raise ValueError(f"{p}: not a raylm eval.json (needs model, perplexity, tasks)")
    return report


def compare_table(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Two reports side by side: metric, A, B, B - A ('-' where one report lacks the metric)."""
    ma, mb = flat_metrics(a), flat_metrics(b)
    keys = list(ma) + [k for k in mb if k not in ma]
    width = max([len(k) for k in keys] + [6])

    def cell(m: dict[str, tuple[float, str]], k: str) -> str:
        return f"{m[k][0]:>10.3f}" if k in m else f"{'-':>10}"

    lines = [f"A: {a['model']}", f"B: {b['model']}"]
    lines.append(f"{'metric':<{width}}  {'A':>10}  {'B':>10}  {'B - A':>10}")
    for k in keys:
        delta = f"{mb[k][0] - ma[k][0]:>+10.3f}" if k in ma and k in mb else f"{'-':>10}"
        lines.append(f"{k:<{width}}  {cell(ma, k)}  {cell(mb, k)}  {delta}")
    return "\n".join(lines)
