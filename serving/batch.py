"""Offline batch inference, per batch: input rows -> engine requests -> one result per row.

No Ray here; ``serving.batch_job`` maps these over Ray Data. Two stages, each a plain function or
callable class over ``dict[str, np.ndarray]`` batches:

    parse_files    (Ray tasks; no tokenizer)  file bytes -> one row per line, its fields checked and
                                              its sampling parameters resolved, or its error
    GenerateBatch  (actor pool; one engine)   rows -> prompt ids -> submitted together, so the
                                              engine's continuous batching decodes them as one batch

Every row comes out, with an ``error`` ("file:line: what is wrong") where it could not run: a bad
row never stops the job. Only a failing engine does (an error that is not the row's).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from serving.config import GenerateConfig
from serving.sampling import SamplingParams

__all__ = [
    "PARSED_COLUMNS",
    "RESULT_COLUMNS",
    "SAMPLING_FIELDS",
    "GenerateBatch",
    "InputRow",
    "Job",
    "Outcome",
    "RowError",
    "build_job",
    "iter_rows",
    "parse_files",
    "result_columns",
    "row_sampling",
    "run_jobs",
]

# What parse_files hands the actors, one entry per input row.
PARSED_COLUMNS = ("source", "key", "record", "prompt", "messages", "completion", "params", "error")
# What the actors add, per mode (the driver writes these after the input's own columns).
RESULT_COLUMNS = {
    "generate": ("generated_text", "prompt_tokens", "completion_tokens", "finish_reason"),
    "score": ("completion_logprob", "completion_token_logprobs", "prompt_tokens",
              "completion_tokens"),
}  # fmt: skip
# Row columns that override generate.sampling, and the JSON type each must have.
SAMPLING_FIELDS = {
    "max_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "seed": int,
    "stop": list,
    "ignore_eos": bool,
}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", list: "a list"}
_MAX_STOP = 16
_LINE_BITS = 32  # key = file index << 32 | line: sorts rows in input order


class RowError(ValueError):
    """One row that cannot run; the message says which field and why (the caller adds file:line)."""


@dataclass(frozen=True)
class InputRow:
    source: str  # "file:line" (1-based; parquet: row)
    line: int
    record: dict | None  # None when the line is not a JSON object
    error: str = ""


# ---------------------------------------------------------------- stage 1: files -> rows


def _jsonl_rows(name: str, data: bytes) -> Iterator[InputRow]:
    for lineno, raw in enumerate(io.BytesIO(data), start=1):  # one line at a time
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue  # blank lines are not rows
        source = f"{name}:{lineno}"
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield InputRow(source, lineno, None, "invalid UTF-8")
            continue
        except ValueError as exc:
            yield InputRow(source, lineno, None, f"malformed JSON ({exc})")
            continue
        if not isinstance(obj, dict):
            yield InputRow(source, lineno, None, f"not a JSON object (a {type(obj).__name__})")
            continue
        yield InputRow(source, lineno, obj)


def _parquet_rows(name: str, data: bytes) -> Iterator[InputRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (OSError, pa.ArrowInvalid) as exc:  # not a parquet file: one error row, not the job
        yield InputRow(f"{name}:0", 0, None, f"not a readable parquet file ({exc})")
        return
    row = 0
    for batch in table.to_batches(max_chunksize=1024):
        for obj in batch.to_pylist():
            row += 1
            yield InputRow(f"{name}:{row}", row, obj)


def iter_rows(name: str, data: bytes, fmt: str) -> Iterator[InputRow]:
    """Rows of one input file in file order; ``fmt`` "jsonl" or "parquet"; ``name`` is shown."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    yield from (_parquet_rows if fmt == "parquet" else _jsonl_rows)(name, data)


def _check_type(name: str, value: Any, kind: type) -> None:
    ok = isinstance(value, int | float) if kind is float else isinstance(value, kind)
    if kind is not bool and isinstance(value, bool):  # JSON true is not the number 1
        ok = False
    if not ok:
        raise RowError(f"`{name}` must be {_TYPE_NAMES[kind]} (got {value!r})")


def _stop_strings(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > _MAX_STOP:
        raise RowError(f"`stop` must be a string or a list of up to {_MAX_STOP} (got {value!r})")
    if any(not isinstance(s, str) or not s for s in items):
        raise RowError(f"`stop` takes non-empty strings (got {value!r})")
    return tuple(items)


def row_sampling(record: dict, cfg: GenerateConfig) -> SamplingParams:
    """The row's sampling parameters: ``generate.sampling``, overridden by the row's own columns
    of the same names (null or absent: the config's). Raises RowError naming the field."""
    kw: dict[str, Any] = cfg.sampling.model_dump()
    for name, kind in SAMPLING_FIELDS.items() if cfg.row_sampling else ():
        value = record.get(name)
        if value is None:
            continue
        if name != "stop":  # a string or a list, checked below
            _check_type(name, value, kind)
        kw[name] = value
    kw["stop"] = _stop_strings(kw["stop"])
    if kw["seed"] is not None and not -(2**63) <= kw["seed"] < 2**64:
        raise RowError(f"`seed` must fit in 64 bits (got {kw['seed']})")
    if kw["max_tokens"] < 1:
        raise RowError(f"`max_tokens` must be >= 1 (got {kw['max_tokens']})")
    try:
        return SamplingParams(**kw)
    except ValueError as exc:  # "temperature must be in [0, 2]": the first word is the field
        field = str(exc).split()[0]
        raise RowError(f"`{field}` {str(exc)[len(field) + 1 :]} (got {kw.get(field)!r})") from None


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    """OpenAI-style messages (content a string or text parts) -> [{role, content}]."""
    if not isinstance(value, list) or not value:
        raise RowError(f"`{field}` must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(
            isinstance(p, dict) and isinstance(p.get("text"), str) for p in content
        ):
            content = "".join(p["text"] for p in content)
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowError(f"`{field}[{i}]` must be an object with string `role` and `content`")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _request_fields(record: dict, cfg: GenerateConfig) -> tuple[str, str, str]:
    """(prompt, messages as JSON, completion) of a row; exactly one of prompt and messages."""
    prompt, messages = record.get(cfg.prompt_field), record.get(cfg.messages_field)
    if prompt is not None and messages is not None:
        raise RowError(f"both `{cfg.prompt_field}` and `{cfg.messages_field}`; give one")
    if prompt is None and messages is None:
        raise RowError(f"no `{cfg.prompt_field}` or `{cfg.messages_field}` field")
    if prompt is not None and not isinstance(prompt, str):
        raise RowError(f"`{cfg.prompt_field}` must be a string (got {type(prompt).__name__})")
    chat = json.dumps(_messages(messages, cfg.messages_field)) if messages is not None else ""
    completion = ""
    if cfg.mode == "score":
        completion = record.get(cfg.completion_field)
        if not isinstance(completion, str) or not completion:
            raise RowError(f"`{cfg.completion_field}` must be a non-empty string (score mode)")
    return prompt or "", chat, completion


def _parsed(row: InputRow, key: int, cfg: GenerateConfig) -> tuple:
    """One row of PARSED_COLUMNS."""
    record = json.dumps(row.record, ensure_ascii=False, default=str) if row.record else ""
    if row.record is None:
        return (row.source, key, record, "", "", "", "", f"{row.source}: {row.error}")
    try:
        prompt, chat, completion = _request_fields(row.record, cfg)
        params = "" if cfg.mode == "score" else _params_json(row_sampling(row.record, cfg))
    except RowError as exc:
        return (row.source, key, record, "", "", "", "", f"{row.source}: {exc}")
    return (row.source, key, record, prompt, chat, completion, params, "")


def _params_json(p: SamplingParams) -> str:
    return json.dumps({k: getattr(p, k) for k in SAMPLING_FIELDS})


def parse_files(
    batch: dict[str, np.ndarray], cfg: GenerateConfig, files: dict[str, tuple[str, int, str]]
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: files (``path``, ``bytes``) -> PARSED_COLUMNS, in chunks of batch_size rows.

    ``files``: path -> (the name rows show, the file's place in input order, its format).
    """
    rows: list[tuple] = []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        # Ray may hand a local path back without its leading slash.
        name, number, fmt = files.get(str(path)) or files["/" + str(path)]
        for row in iter_rows(name, data, fmt):
            rows.append(_parsed(row, (number << _LINE_BITS) | row.line, cfg))
            if len(rows) >= cfg.batch_size:
                yield _columns(rows)
                rows = []
    if rows:
        yield _columns(rows)


def _columns(rows: list[tuple]) -> dict[str, np.ndarray]:
    out = {c: _objects([r[i] for r in rows]) for i, c in enumerate(PARSED_COLUMNS)}
    out["key"] = out["key"].astype(np.int64)
    return out


def _objects(values: list) -> np.ndarray:
    """A 1-D object array, also of equal-length lists (which np.asarray would stack into 2-D)."""
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


# ---------------------------------------------------------------- stage 2: rows -> results


@dataclass(frozen=True)
class Job:
    """One engine request: ``scored`` lists the positions whose log-probs a score row sums."""

    source: str  # "file:line", which starts the row's error if it fails
    ids: list[int]
    params: SamplingParams
    scored: tuple[int, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """One row's result. With ``error`` set the rest is meaningless (written as null): Ray Data
    turns a None among ints into NaN, so missing values travel as these typed defaults."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    logprob: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)
    error: str = ""


def _outcome(job: Job, events: list) -> Outcome:
    """A finished stream's events -> the row's result (score: the scored positions' log-probs)."""
    last = events[-1]
    if job.scored:
        lps = events[0].prompt_logprobs
        values = [float(lps[i].logprob) for i in job.scored]
        prompt = len(job.ids) - len(values)
        return Outcome("", prompt, len(values), "", math.fsum(values), values)
    completion = sum(len(ev.token_ids) for ev in events)
    prompt = last.usage.prompt_tokens if last.usage is not None else len(job.ids)
    text = "".join(ev.text for ev in events)
    return Outcome(text, prompt, completion, last.finish_reason or "length")


async def _run_one(backend: Any, job: Job, gate: asyncio.Semaphore) -> Outcome:
    from serving.backend import RequestTimeout

    async with gate:
        try:
            stream = backend.submit(job.ids, job.params)
        except ValueError as exc:  # the engine's own checks (context length, empty prompt)
            return Outcome(error=f"{job.source}: {exc}")
        try:
            events = [ev async for ev in stream]
        except RequestTimeout as exc:  # too slow for the config, not broken: the row's error
            return Outcome(error=f"{job.source}: {exc}; raise generate.engine.request_timeout_s")
    return _outcome(job, events)


async def run_jobs(backend: Any, jobs: list[Job | str], gate: asyncio.Semaphore) -> list[Outcome]:
    """Every job submitted at once (``gate`` bounds how many the engine holds), results in order.

    A ``str`` in ``jobs`` is a row error and stays one. Engine failures other than a row's timeout
    (``EngineError``) propagate: they are not the row's fault, and its output would lie.
    """

    async def one(job: Job | str) -> Outcome:
        if isinstance(job, str):
            return Outcome(error=job)
        return await _run_one(backend, job, gate)

    return list(await asyncio.gather(*(one(j) for j in jobs)))


class GenerateBatch:
    """Ray Data actor UDF: one engine (``generate.engine``, builtin or vLLM) serving every call.

    The engine's streams live on one event loop, run by a thread of this actor for its whole life
    (vLLM's AsyncLLM is bound to the loop it first runs on). Calls may arrive on several threads
    at once (``generate.calls_per_actor``): each submits its rows to the same engine, so the
    engine keeps decoding one call's rows while another call's last rows finish.
    """

    def __init__(self, cfg: GenerateConfig) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # levanter#568: memory growth in workers
        self.cfg = cfg
        engine = cfg.engine
        if engine.torch_threads is None:  # the actor's share of the CPUs, not the whole machine
            engine = engine.model_copy(update={"torch_threads": max(1, int(cfg.actor_cpus))})
        self._loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._loop.run_forever, name="raylm-generate", daemon=True)
        thread.start()
        try:
            self.backend = self._on_loop(self._load(engine))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self.tokenizer = self.backend.tokenizer
        self._chat_stop = _chat_stop_ids(self.tokenizer)
        # Running slots plus as many queued (within the engine's queue, so never overloaded): a
        # slot that frees is refilled at the next step.
        queued = min(engine.max_waiting, engine.max_num_seqs)
        self._gate = asyncio.Semaphore(engine.max_num_seqs + queued)
        self._tokenize_lock = threading.Lock()  # fast tokenizers refuse concurrent mutation

    async def _load(self, engine: Any) -> Any:
        """Blocks the loop while loading, on purpose: the backend is built on the loop's thread."""
        from serving.backend import BackendUnavailable, load_backend

        try:
            return load_backend(self.cfg.model, engine, adapter=self.cfg.adapter)
        except BackendUnavailable as exc:  # its message names the endpoint's key
            raise BackendUnavailable(str(exc).replace("serve.engine", "generate.engine")) from None

    def _on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._tokenize_lock:
            jobs = [self._job(batch, i) for i in range(len(batch["source"]))]
        outcomes = self._on_loop(run_jobs(self.backend, jobs, self._gate))
        return result_columns(batch, outcomes, self.cfg.mode)

    def shutdown(self) -> None:
        """Stop the engine and the loop (a Ray actor just exits; tests and benchmarks call it)."""
        self.backend.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _job(self, batch: dict[str, np.ndarray], i: int) -> Job | str:
        """Row i as an engine request, or its error ("file:line: ...")."""
        if batch["error"][i]:
            return str(batch["error"][i])
        row = {c: str(batch[c][i]) for c in PARSED_COLUMNS if c != "key"}
        try:
            return build_job(self.tokenizer, self.backend.max_model_len, self._chat_stop, row,
                             self.cfg.mode)  # fmt: skip
        except RowError as exc:
            return f"{row['source']}: {exc}"


def _chat_stop_ids(tok: Any) -> tuple[int, ...]:
    from data_pipelines.chat import end_of_turn_ids

    return end_of_turn_ids(tok) if getattr(tok, "chat_template", None) else ()


def _prompt_ids(tok: Any, prompt: str, messages: str) -> list[int]:
    """Token ids the engine continues: the text as is, or the chat with its generation prompt.

    Both tokenized without added special tokens, as the endpoint does (an empty text prompt is
    the start token alone)."""
    if messages:
        if not getattr(tok, "chat_template", None):
            raise RowError("the model has no chat template; give a plain prompt")
        try:
            text = tok.apply_chat_template(
                json.loads(messages), add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # a template may refuse a role order: the row's fault
            raise RowError(f"the chat template rejected the messages: {exc}") from None
        return tok(text, add_special_tokens=False)["input_ids"]
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return ids or ([tok.bos_token_id] if tok.bos_token_id is not None else [])


def _score_ids(tok: Any, row: dict[str, str]) -> tuple[list[int], tuple[int, ...]]:
    """(ids, scored positions): the prompt then the completion; a chat's completion is the
    assistant's answer with its end-of-turn token, tokenized as preference training does."""
    if row["messages"]:
        from data_pipelines.formats import RecordProblem
        from data_pipelines.tokenize import encode_conversation

        answer = {"role": "assistant", "content": row["completion"]}
        try:
            ids, labels = encode_conversation(tok, [*json.loads(row["messages"]), answer],
                                              last_only=True)  # fmt: skip
        except (RecordProblem, ValueError) as exc:
            raise RowError(f"the chat template cannot score this answer: {exc}") from None
        return ids.tolist(), tuple(int(i) for i in np.flatnonzero(labels >= 0))
    prompt = _prompt_ids(tok, row["prompt"], "")
    completion = tok(row["completion"], add_special_tokens=False)["input_ids"]
    return prompt + completion, tuple(range(len(prompt), len(prompt) + len(completion)))


def build_job(
    tok: Any, max_model_len: int, chat_stop: tuple[int, ...], row: dict[str, str], mode: str
) -> Job:
    """A parsed row (PARSED_COLUMNS but ``key``, as strings) -> its engine request.

    ``chat_stop``: the end-of-turn ids a chat row stops at (besides the model's eos ids)."""
    if mode == "score":
        ids, scored = _score_ids(tok, row)
        params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0)
    else:
        ids, scored = _prompt_ids(tok, row["prompt"], row["messages"]), ()
        kw = json.loads(row["params"])
        params = SamplingParams(**{**kw, "stop": tuple(kw["stop"])})
        if row["messages"] and not params.ignore_eos:
            params = replace(params, stop_token_ids=chat_stop)
    if not ids or (mode == "score" and not scored):
        raise RowError("the prompt is empty" if not ids else "the completion has no tokens")
    if len(ids) >= max_model_len:
        raise RowError(f"the prompt has {len(ids)} tokens; the model's context is {max_model_len}")
    return Job(row["source"], ids, params, scored)


def result_columns(
    batch: dict[str, np.ndarray], outcomes: list[Outcome], mode: str
) -> dict[str, np.ndarray]:
    """What leaves the actor: the row's identity and input, its results, its error ("": none)."""
    out = {c: batch[c] for c in ("source", "key", "record")}
    attrs = {
        "generated_text": ("text", object),
        "prompt_tokens": ("prompt_tokens", np.int64),
        "completion_tokens": ("completion_tokens", np.int64),
        "finish_reason": ("finish_reason", object),
        "completion_logprob": ("logprob", np.float64),
        "completion_token_logprobs": ("token_logprobs", object),
        "error": ("error", object),
    }
    for column in (*RESULT_COLUMNS[mode], "error"):
        attr, dtype = attrs[column]
        values = [getattr(o, attr) for o in outcomes]
        out[column] = _objects(values) if dtype is object else np.asarray(values, dtype=dtype)
    return out
