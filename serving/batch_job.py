"""``raylm generate``: prompts -> an actor pool of the serving engine -> parquet, over Ray Data.

Ray edge of offline batch inference; the per-batch logic is ``serving.batch``. The flow:

    read_binary_files (one row per input file, sorted by path)
      -> parse_files    (tasks: one row per line, fields and sampling checked, errors kept)
      -> repartition    (blocks of generate.batch_size rows, so one big file feeds every actor)
      -> GenerateBatch  (actor pool of generate.num_actors engines, fractional CPUs each)
      -> driver: rows in (file, line) order into results/part-*.parquet, then manifest.json

Ray Data runs with ``preserve_order``, so the output's row order is the input's whatever the actor
count, batch size or which actor finished first. ``manifest.json`` is written last and holds a
fingerprint of every input byte, the model dir's files and the config keys that change the output:
a re-run that finds a complete output with the same fingerprint does nothing, as ``data prepare``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipelines.actor_pool import restarts_as_remote_arg
from data_pipelines.errors import DataError
from data_pipelines.manifest import MANIFEST_NAME, fingerprint_inputs, write_manifest
from data_pipelines.readers import InputFiles, detect_format, expand_inputs
from serving.batch import RESULT_COLUMNS, GenerateBatch, parse_files
from serving.batch_writer import ResultWriter
from serving.config import GenerateConfig

__all__ = ["GeneratePlan", "GenerateResult", "generate", "plan_generate", "summarize"]

log = logging.getLogger("raylm.serving.generate")
RESULTS_DIR = "results"
FORMAT_VERSION = 1
ERROR_SAMPLES = 5
# Keys that change how fast or where the job runs, never what it writes. (Inputs, model and
# adapter count by their content, not their paths.)
_OUTPUT_NEUTRAL = {"inputs", "output", "model", "adapter", "s3", "num_actors", "actor_cpus",
                   "actor_gpus", "batch_size", "calls_per_actor", "actor_restarts"}  # fmt: skip
# (request_timeout_s counts: a row that timed out is an error a longer timeout would not write.)
_ENGINE_NEUTRAL = {"max_num_seqs", "max_batched_tokens", "max_waiting", "torch_threads", "warmup"}


@dataclass
class GeneratePlan:
    """What a run would read and the fingerprint that decides whether it must run at all."""

    files: InputFiles
    formats: dict[str, str]  # path -> "jsonl" | "parquet"
    input_hashes: dict[str, str]
    model_fingerprint: str
    config_hash: str
    fingerprint: str
    existing: dict | None  # manifest of a complete output with this fingerprint


@dataclass
class GenerateResult:
    output: Path
    manifest: dict
    skipped: bool = False


def _inputs(cfg: GenerateConfig) -> tuple[InputFiles, dict[str, str]]:
    """The input files in output order and each one's format. Files in another format (a README
    in a directory of prompts) are passed over with a warning; an input without any is an error."""
    try:
        files = expand_inputs(cfg.inputs, cfg.format, cfg.s3.endpoint_url, cfg.s3.region)
    except DataError as exc:  # the readers name data.* keys
        msg = str(exc).replace("data.inputs", "generate.inputs")
        raise DataError(msg.replace("data.format", "generate.format")) from None
    formats = {p: detect_format(files.display[p], cfg.format) for p in files.paths}
    other = [files.display[p] for p, fmt in formats.items() if fmt not in ("jsonl", "parquet")]
    if other:
        log.warning("generate.inputs: passing over %d file(s) that are neither jsonl nor parquet, "
                    "e.g. %s", len(other), other[0])  # fmt: skip
    paths = [p for p in files.paths if files.display[p] not in other]
    if not paths:
        raise DataError(f"generate.inputs: no jsonl or parquet files in {cfg.inputs}")
    display = {p: files.display[p] for p in paths}
    return InputFiles(paths, display, files.filesystem), {p: formats[p] for p in paths}


def _model_files(cfg: GenerateConfig) -> InputFiles:
    """Every file of the model dir (and the adapter's): what the fingerprint covers."""
    dirs = [("generate.model", cfg.model)] + (
        [("generate.adapter", cfg.adapter)] if cfg.adapter else []
    )
    display = {}
    for key, d in dirs:
        if not d:
            raise DataError(f"{key}: unset; name an exported Hugging Face model dir")
        root = Path(d)
        marker = "adapter_config.json" if key == "generate.adapter" else "config.json"
        if not (root / marker).is_file():
            raise DataError(f"{key}: {d}: not a Hugging Face model dir (no {marker})")
        for f in sorted(root.rglob("*")):
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts):
                display[str(f.resolve())] = f"{key}/{f.relative_to(root)}"
    return InputFiles(paths=sorted(display), display=display, filesystem=None)


def _config_hash(cfg: GenerateConfig) -> str:
    data = cfg.model_dump(mode="json", exclude=_OUTPUT_NEUTRAL)
    data["engine"] = {k: v for k, v in data["engine"].items() if k not in _ENGINE_NEUTRAL}
    data["format_version"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def plan_generate(cfg: GenerateConfig) -> GeneratePlan:
    """Resolve inputs and hash them and the model once. Needs no Ray: the CLI calls it first, so
    a re-run on a complete output returns without starting Ray."""
    files, formats = _inputs(cfg)
    model_files = _model_files(cfg)  # checked before any input byte is hashed
    input_hashes = fingerprint_inputs(files)
    model_fp = _digest(fingerprint_inputs(model_files))
    cfg_hash = _config_hash(cfg)
    # Input names count (unlike data prepare's): every row's `source` shows its file's name.
    ordered = [[files.display[p], input_hashes[files.display[p]]] for p in files.paths]
    fingerprint = _digest({"inputs": ordered, "model": model_fp, "config": cfg_hash})
    existing = _complete_manifest(Path(cfg.output), fingerprint)
    return GeneratePlan(files, formats, input_hashes, model_fp, cfg_hash, fingerprint, existing)


def _complete_manifest(output: Path, fingerprint: str) -> dict | None:
    """The manifest of a finished run with this fingerprint whose files are all intact, else None."""
    try:
        manifest = json.loads((output / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for name, size in manifest.get("file_sizes", {}).items():
        f = output / RESULTS_DIR / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return manifest


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data's DataContext is process-global: set what this job needs, restore it after."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    opts = ctx.execution_options
    saved = (opts.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
             ctx.raise_original_map_exception)  # fmt: skip
    opts.preserve_order = True  # rows leave in input order, whichever actor finished first
    ctx.enable_progress_bars = False  # raylm's bar counts rows and tokens; Ray's would bury it
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # an engine failure reaches the driver as itself
    # Ray Data's UserWarnings (e.g. fewer blocks than actors) go through logging: to raylm.log,
    # not the console, when the command keeps Ray's chatter in the log file.
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        (opts.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start,
         ctx.raise_original_map_exception) = saved  # fmt: skip


def _check_pool(cfg: GenerateConfig) -> None:
    """An actor pool holding every CPU starves Ray Data's read tasks forever (seen here)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    if cfg.num_actors * cfg.actor_cpus >= cpus:
        raise DataError(f"generate.num_actors ({cfg.num_actors}) x generate.actor_cpus "
                        f"({cfg.actor_cpus}) reserve all {cpus:g} CPUs Ray has; Ray Data's "
                        "read tasks would wait forever: lower one of them")  # fmt: skip


def _build_dataset(cfg: GenerateConfig, plan: GeneratePlan):
    import ray
    from ray.data import ActorPoolStrategy

    files = plan.files
    info = {p: (files.display[p], i, plan.formats[p]) for i, p in enumerate(files.paths)}
    ds = ray.data.read_binary_files(
        files.paths,
        include_paths=True,
        filesystem=files.filesystem,
        shuffle=None,
        override_num_blocks=len(files.paths),
    )
    ds = ds.map_batches(parse_files, fn_kwargs={"cfg": cfg, "files": info}, batch_size=1)
    ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    pool = ActorPoolStrategy(
        size=cfg.num_actors,
        max_concurrent_calls_per_actor=cfg.calls_per_actor,
        enable_true_multi_threading=True,  # calls share the engine; it runs on its own thread
    )
    with restarts_as_remote_arg():
        return ds.map_batches(
            GenerateBatch,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.batch_size,
            compute=pool,
            num_cpus=cfg.actor_cpus,
            num_gpus=cfg.actor_gpus or None,
            max_restarts=cfg.actor_restarts,
        )


@dataclass
class _Tally:
    rows: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish: Counter = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    last_key: int = -1

    def add(self, batch: dict) -> None:
        for i, key in enumerate(batch["key"]):
            if key <= self.last_key:  # preserve_order broken: the output would be misordered
                raise RuntimeError(f"generate: {batch['source'][i]} arrived out of input order")
            self.last_key = int(key)
            error = batch["error"][i]
            if error:
                self.errors += 1
                if len(self.samples) < ERROR_SAMPLES:
                    self.samples.append(str(error))
                continue
            self.prompt_tokens += int(batch["prompt_tokens"][i])
            self.completion_tokens += int(batch["completion_tokens"][i])
            if "finish_reason" in batch:
                self.finish[str(batch["finish_reason"][i])] += 1
        self.rows += len(batch["key"])


def _run(ds, cfg: GenerateConfig, output: Path, progress: bool) -> tuple[ResultWriter, _Tally]:
    """Rows in order into the writer, with one progress line: rows, rows/s, tokens/s, errors."""
    from tqdm import tqdm

    writer = ResultWriter(output / RESULTS_DIR, cfg.rows_per_file, RESULT_COLUMNS[cfg.mode])
    tally = _Tally()
    start = time.perf_counter()
    with tqdm(desc="raylm generate", unit="row", disable=not progress, mininterval=1.0) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            tally.add(batch)
            writer.add(batch)
            elapsed = max(time.perf_counter() - start, 1e-9)
            tokens = tally.completion_tokens + (tally.prompt_tokens if cfg.mode == "score" else 0)
            bar.set_postfix_str(f"{tokens / elapsed:.0f} tokens/s, {tally.errors} errors",
                                refresh=False)  # fmt: skip
            bar.update(len(batch["key"]))
    writer.close()
    return writer, tally


def generate(
    cfg: GenerateConfig, progress: bool = True, plan: GeneratePlan | None = None
) -> GenerateResult:
    """Run the whole job on the connected Ray; skips when ``cfg.output`` holds this exact result."""
    start = time.perf_counter()
    plan = plan or plan_generate(cfg)
    output = Path(cfg.output)
    if plan.existing is not None:
        log.info("generate: %s is complete for these inputs, model and config; skipping", output)
        return GenerateResult(output, plan.existing, skipped=True)
    _check_pool(cfg)
    (output / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted run never looks complete
    shutil.rmtree(output / RESULTS_DIR, ignore_errors=True)
    with _data_context():
        try:
            writer, tally = _run(_build_dataset(cfg, plan), cfg, output, progress)
        except Exception as exc:
            reason = _actor_start_error(exc)
            if reason is None:
                raise
            log.info("generate: an engine actor failed to start", exc_info=exc)  # the log file
            raise DataError(f"generate: an engine actor failed to start: {reason}") from None
    seconds = time.perf_counter() - start
    manifest = _manifest(cfg, plan, writer, tally, seconds)
    write_manifest(output, manifest)
    return GenerateResult(output, manifest)


def _actor_start_error(exc: BaseException) -> str | None:
    """The last line of an actor constructor's error (e.g. vllm missing, a model that does not
    load on a worker), when that is what stopped the job: Ray hands it over as text only."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if getattr(cause, "actor_init_failed", False):
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(getattr(cause, "error_msg", "")))
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            return lines[-1] if lines else "unknown error"
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    return None


def _manifest(cfg, plan: GeneratePlan, writer: ResultWriter, tally: _Tally, seconds: float) -> dict:
    names = [p.name for p in writer.parts]
    results = Path(cfg.output) / RESULTS_DIR
    return {
        "format_version": FORMAT_VERSION,
        "mode": cfg.mode,
        "rows": tally.rows,
        "errors": tally.errors,
        "error_samples": tally.samples,
        "finish_reasons": dict(sorted(tally.finish.items())),
        "prompt_tokens": tally.prompt_tokens,
        "completion_tokens": tally.completion_tokens,
        "files": names,
        "file_sizes": {n: (results / n).stat().st_size for n in names},
        "checksums": writer.checksums(),
        "model": {
            "path": str(Path(cfg.model).resolve()),
            "fingerprint": plan.model_fingerprint,
            "adapter": str(Path(cfg.adapter).resolve()) if cfg.adapter else None,
        },  # fmt: skip
        "inputs": plan.input_hashes,
        "config_hash": plan.config_hash,
        "fingerprint": plan.fingerprint,
        "seconds": round(seconds, 3),
    }


def summarize(result: GenerateResult) -> str:
    """One screen: rows, errors with samples, tokens, finish reasons, where the output is."""
    m = result.manifest
    lines = [f"raylm generate: {result.output / RESULTS_DIR}"
             + ("  (already complete: skipped)" if result.skipped else "")]  # fmt: skip
    lines.append(f"  rows: {m['rows']} ({m['errors']} with an error)")
    lines += [f"    e.g. {s}" for s in m["error_samples"]]
    if m["mode"] == "generate":
        lines.append(f"  tokens: {m['prompt_tokens']} prompt, {m['completion_tokens']} generated")
        reasons = ", ".join(f"{k} {v}" for k, v in m["finish_reasons"].items()) or "none"
        lines.append(f"  finish reasons: {reasons}")
    else:
        lines.append(f"  tokens: {m['prompt_tokens']} prompt, {m['completion_tokens']} scored")
    if not result.skipped:
        rate = m["completion_tokens"] / max(m["seconds"], 1e-9)
        lines.append(f"  took {m['seconds']:.1f}s ({m['rows'] / max(m['seconds'], 1e-9):.1f} "
                     f"rows/s, {rate:.0f} tokens/s including start-up)")  # fmt: skip
    return "\n".join(lines)
