"""``raylm data prepare``: corpora -> cleaned, deduplicated, tokenized, packed parquet + manifest.

Ray edge of the data stage. The flow, streaming end to end:

    read_binary_files (one row per shard, sorted by path)
      -> ProcessShards     (actor pool of data.num_actors, one shard at a time: line-level parse,
                            normalize, PII, length filter, hash, split; TokenizeBatch)
      -> driver, in (shard path, line) order: mark_duplicates against the hash-partitioned
         DedupShard actors, tally rejections, pack sequentially, write fixed-size parquet shards

Ray Data runs with ``preserve_order`` so documents reach the driver in (shard path, line) order
whatever the block sizes or actor counts. Duplicates are decided there, in that order, so the
first copy in (shard, line) order is the one kept (deciding them in the actors would keep whichever
copy an actor reached first, and move every packed row after it); packing and writing are
sequential, so the same inputs and config give sha256-identical files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipelines.actor_pool import restarts_as_remote_arg
from data_pipelines.clean import content_hash, is_validation, normalize_text, redact_pii
from data_pipelines.config import DataConfig
from data_pipelines.errors import DataError
from data_pipelines.formats import RecordFields
from data_pipelines.manifest import (
    MANIFEST_NAME,
    build_manifest,
    combined_fingerprint,
    data_config_hash,
    existing_complete_manifest,
    fingerprint_inputs,
    write_manifest,
)
from data_pipelines.pack import ConversationPacker, DocumentPacker, PairRows
from data_pipelines.readers import STRICT_REASONS, InputFiles, expand_inputs, parse_file
from data_pipelines.tokenize import (
    TokenizeBatch,
    add_default_chat_template,
    check_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
)
from data_pipelines.writer import PREFERENCE_COLUMNS, ShardWriter

__all__ = [
    "PrepareResult",
    "Plan",
    "plan_prepare",
    "iter_clean_chunks",
    "parse_and_clean",
    "prepare",
    "summarize",
]

log = logging.getLogger("raylm.data")
SAMPLES_PER_REASON = 3
# sft with a tokenizer that has no chat template: the copy with raylm's default template, in OUTPUT.
AUGMENTED_TOKENIZER_DIR = "tokenizer"


@dataclass
class PrepareResult:
    output: Path
    manifest: dict
    skipped: bool = False
    seconds: float = 0.0


# TokenizeBatch's preference columns, in PairRows.add's order.
_PAIR_INPUTS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")
_ROW_KEYS = ("source", "reason", "detail", "text", "hash", "validation")


def iter_clean_chunks(
    batch: dict[str, np.ndarray], cfg: DataConfig, display: dict[str, str], chunk_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Records of a batch of shards, parsed and cleaned, in column chunks of ``chunk_size`` rows.

    One output row per record (kept or rejected). Columns: source (str "file:line"), reason (str,
    "" if kept), detail (str: what is wrong, for reasons that name a field), text (str; sft:
    messages as canonical JSON; preference: prompt/chosen/rejected as JSON), hash (16 bytes),
    validation (bool), pii_<kind> (int32). Chunking keeps a worker's memory at one chunk.
    """
    fields = RecordFields.from_config(cfg)
    kinds = list(cfg.pii.kinds) if cfg.pii.enabled else []
    rows: dict[str, list] = {k: [] for k in (*_ROW_KEYS, *kinds)}
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        name = display.get(path) or display.get("/" + path) or str(path)
        for rec in parse_file(name, data, cfg.format, fields, cfg.text_unit):
            text, pii = _clean_record(rec.payload, rec.reason, cfg)
            reason = rec.reason or _length_reason(text, cfg)
            if cfg.strict and reason in STRICT_REASONS:
                raise DataError(strict_message(rec.source, reason, rec.detail))
            digest = content_hash(text) if not reason else b"\0" * 16
            rows["source"].append(rec.source)
            rows["reason"].append(reason)
            rows["detail"].append(rec.detail)
            rows["text"].append(text if not reason else "")
            rows["hash"].append(digest)
            rows["validation"].append(not reason and is_validation(digest, cfg.validation_fraction))
            for kind in kinds:
                rows[kind].append(pii.get(kind, 0))
            if len(rows["reason"]) >= chunk_size:
                yield _columns(rows, kinds)
                rows = {k: [] for k in rows}
    if rows["reason"]:
        yield _columns(rows, kinds)


def strict_message(source: str, reason: str, detail: str = "") -> str:
    """The one-line error of data.strict: file:line, reason and, when known, what is wrong."""
    return f"{source}: {reason}{': ' + detail if detail else ''} (data.strict is on)"


def _columns(rows: dict[str, list], kinds: list[str]) -> dict[str, np.ndarray]:
    out = {k: np.asarray(rows[k], dtype=object) for k in _ROW_KEYS}
    out["validation"] = np.asarray(rows["validation"], dtype=np.bool_)
    for kind in kinds:
        out[f"pii_{kind}"] = np.asarray(rows[kind], dtype=np.int32)
    return out


def parse_and_clean(batch: dict[str, np.ndarray], cfg: DataConfig, display: dict[str, str]):
    """All records of a batch of shards as one column dict (see ``iter_clean_chunks``)."""
    chunks = list(iter_clean_chunks(batch, cfg, display, chunk_size=2**62))
    kinds = list(cfg.pii.kinds) if cfg.pii.enabled else []
    return chunks[0] if chunks else _columns({k: [] for k in (*_ROW_KEYS, *kinds)}, kinds)


def _clean_text(text: str, cfg: DataConfig, pii: Counter) -> str:
    n = cfg.normalize
    text = normalize_text(text, n.unicode, n.collapse_whitespace)
    if cfg.pii.enabled:
        text, counts = redact_pii(text, cfg.pii.kinds)
        pii.update(counts)
    return text


def _clean_messages(messages: list[dict], cfg: DataConfig, pii: Counter) -> list[dict]:
    return [{"role": m["role"], "content": _clean_text(m["content"], cfg, pii)} for m in messages]


def _clean_record(payload, reason: str, cfg: DataConfig) -> tuple[str, dict[str, int]]:
    """Cleaned text, or the cleaned chat / preference record as canonical JSON; PII counts."""
    if reason:
        return "", {}
    pii: Counter = Counter()
    if isinstance(payload, str):
        return _clean_text(payload, cfg, pii), dict(pii)
    if isinstance(payload, list):  # sft messages: clean each content, keep the structure
        cleaned: list | dict = _clean_messages(payload, cfg, pii)
    else:  # preference pair
        cleaned = {"prompt": _clean_messages(payload["prompt"], cfg, pii),
                   "chosen": _clean_text(payload["chosen"], cfg, pii),
                   "rejected": _clean_text(payload["rejected"], cfg, pii)}  # fmt: skip
    return json.dumps(cleaned, ensure_ascii=False, sort_keys=True), dict(pii)


def _length_reason(text: str, cfg: DataConfig) -> str:
    if cfg.mode != "pretrain":
        return ""  # conversations and pairs are measured in tokens at tokenize time
    if len(text) < cfg.min_chars or not text:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    return ""


@dataclass
class _Tally:
    read: int = 0
    kept: int = 0
    truncated: int = 0
    rejected: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def reject(self, reason: str, source: str, detail: str = "") -> None:
        self.rejected[reason] += 1
        bucket = self.samples.setdefault(reason, [])
        if len(bucket) < SAMPLES_PER_REASON:
            bucket.append(f"{source}: {detail}" if detail else source)


class _scoped_data_context:
    """Ray Data's DataContext is process-global: set what this job needs and restore it after."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __enter__(self):
        from ray.data import DataContext

        ctx = DataContext.get_current()
        opts = ctx.execution_options
        self.saved = (
            opts.preserve_order,
            opts.resource_limits,
            ctx.target_max_block_size,
            ctx.raise_original_map_exception,
        )
        opts.preserve_order = True
        if self.cfg.object_store_mb:
            from ray.data import ExecutionResources

            # Bounds in-flight blocks, so memory stays flat however large the corpus.
            opts.resource_limits = ExecutionResources.for_limits(
                object_store_memory=self.cfg.object_store_mb * 2**20
            )
        # Let a DataError (strict mode, bad shard) reach the driver as itself, not as a wrapper.
        ctx.raise_original_map_exception = True
        if self.cfg.block_size_mb:
            ctx.target_max_block_size = self.cfg.block_size_mb * 1024 * 1024
        return ctx

    def __exit__(self, *exc):
        from ray.data import DataContext

        ctx = DataContext.get_current()
        (
            ctx.execution_options.preserve_order,
            ctx.execution_options.resource_limits,
            ctx.target_max_block_size,
            ctx.raise_original_map_exception,
        ) = self.saved
        return False


class ProcessShards:
    """Actor-pool UDF: shards in, their cleaned, tokenized records out (dedup: the driver).

    One actor runs parse -> clean -> dedup -> tokenize on a whole shard, so only the shard's bytes go
    in and compact token arrays come out: measured on 2 cores, passing the cleaned text between
    separate task and actor stages cost more than the tokenization it parallelised. The tokenizer
    is loaded once per actor; records leave in chunks of ``batch_size`` so output streams.
    """

    def __init__(self, cfg: DataConfig, display: dict, tokenizer_path: str, eos_id: int):
        self.cfg, self.display = cfg, display
        self.tokenize = TokenizeBatch(tokenizer_path, cfg.mode, cfg.seq_len, cfg.sft.overlong,
                                      eos_id=eos_id, system_fallback=cfg.sft.system_fallback)  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for chunk in iter_clean_chunks(batch, self.cfg, self.display, self.cfg.batch_size):
            out = self.tokenize(chunk)
            if self.cfg.strict:  # the chat template's own rejections stop a strict run too
                for i, reason in enumerate(out["reason"]):
                    if reason in STRICT_REASONS:
                        raise DataError(strict_message(out["source"][i], reason, out["detail"][i]))
            yield out


def _dedup_shards(cfg: DataConfig) -> list:
    """The hash-partitioned dedup actors (none with dedup off)."""
    import ray

    from data_pipelines.dedup import DedupShard

    if not cfg.dedup.enabled:
        return []
    # The dedup actors need no CPU reservation: they only answer set lookups.
    shard_cls = ray.remote(num_cpus=0)(DedupShard)
    return [shard_cls.remote() for _ in range(cfg.dedup.partitions)]


def _build_dataset(cfg: DataConfig, files: InputFiles, tokenizer_path: str, eos_id: int):
    import ray

    ds = ray.data.read_binary_files(
        files.paths,
        include_paths=True,
        filesystem=files.filesystem,
        shuffle=None,
        override_num_blocks=len(files.paths),
    )
    with restarts_as_remote_arg():
        return _map_shards(ds, cfg, files, tokenizer_path, eos_id)


def _map_shards(ds, cfg: DataConfig, files: InputFiles, tokenizer_path: str, eos_id: int):
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        ProcessShards,
        fn_constructor_kwargs={
            "cfg": cfg,
            "display": files.display,
            "tokenizer_path": str(Path(tokenizer_path).resolve()),
            "eos_id": eos_id,
        },
        compute=ActorPoolStrategy(size=min(cfg.num_actors, len(files.paths))),
        num_cpus=cfg.actor_cpus,
        max_restarts=cfg.actor_restarts,
        batch_size=1,
    )


def _unwrap_data_error(exc: BaseException | None) -> DataError | None:
    """The DataError a Ray task raised, without Ray's traceback wrapping, if that is the cause."""
    seen = set()
    found = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DataError):
            found = exc  # keep walking: Ray's wrapper is a DataError too, its cause is cleaner
        exc = getattr(exc, "cause", None) or exc.__cause__
    if found is None:
        return None
    return DataError(*found.args[:1]) if type(found) is DataError else DataError(str(found.args[0]))


def _pack_and_write(ds, cfg: DataConfig, output: Path, pad_id: int, progress: bool) -> tuple:
    from tqdm import tqdm

    from data_pipelines.dedup import mark_duplicates

    columns = PREFERENCE_COLUMNS if cfg.mode == "preference" else None
    writers = {
        s: ShardWriter(
            output / s,
            cfg.rows_per_file,
            cfg.mode == "sft",
            columns=columns,
            arrow_copy=cfg.arrow_copy,
        )  # fmt: skip
        for s in ("train", "validation")
    }
    if cfg.mode == "sft":
        packers = {s: ConversationPacker(cfg.seq_len, pad_id, cfg.sft.pack) for s in writers}
    elif cfg.mode == "preference":
        packers = {s: PairRows() for s in writers}
    else:
        packers = {s: DocumentPacker(cfg.seq_len, pad_id) for s in writers}
    tally = _Tally()
    bar = tqdm(desc="prepare", unit="doc", disable=not progress, mininterval=1.0)
    shards = _dedup_shards(cfg)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=4):
        if shards:  # in (shard, line) order: the first copy is the one kept
            batch = mark_duplicates(batch, shards)
        _consume(batch, cfg, packers, writers, tally)
        bar.update(len(batch["reason"]))
    bar.close()
    for split, packer in packers.items():
        for row in packer.flush():
            writers[split].add(row)
        writers[split].close()
    return writers, tally


def _consume(batch, cfg: DataConfig, packers, writers, tally: _Tally) -> None:
    for i, reason in enumerate(batch["reason"]):
        tally.read += 1
        if reason:
            tally.reject(reason, batch["source"][i], batch["detail"][i])
            continue
        tally.kept += 1
        tally.truncated += bool(batch["truncated"][i])
        split = "validation" if batch["validation"][i] else "train"
        if cfg.mode == "preference":
            rows = packers[split].add(*(batch[c][i] for c in _PAIR_INPUTS))
        elif cfg.mode == "sft":
            rows = packers[split].add(batch["input_ids"][i], batch["labels"][i])
        else:
            rows = packers[split].add(batch["input_ids"][i])
        for row in rows:
            writers[split].add(row)
    for kind in cfg.pii.kinds if cfg.pii.enabled else ():
        # Only kept documents' redactions count: rejected ones never reach the output.
        kept = np.asarray([not r for r in batch["reason"]])
        tally.pii[kind] += int(batch[f"pii_{kind}"][kept].sum())


def _clear_outputs(output: Path) -> None:
    (output / MANIFEST_NAME).unlink(missing_ok=True)
    for split in ("train", "validation"):
        shutil.rmtree(output / split, ignore_errors=True)
    output.mkdir(parents=True, exist_ok=True)


@dataclass
class Plan:
    """What a run would read and the fingerprint that decides whether it must run at all."""

    files: InputFiles
    tokenizer_fingerprint: str
    input_hashes: dict[str, str]
    config_hash: str
    fingerprint: str
    existing: dict | None  # manifest of a complete output with this fingerprint


def plan_prepare(cfg: DataConfig, tokenizer_path: str) -> Plan:
    """Resolve inputs and hash them once. Needs no Ray: the CLI calls it first, so a re-run on a
    complete output returns without starting Ray, and ``prepare(plan=...)`` reuses the hashes."""
    files = expand_inputs(cfg.inputs, cfg.format, cfg.s3.endpoint_url, cfg.s3.region, cfg.hf_split)
    tok_fp = tokenizer_fingerprint(tokenizer_path)
    input_hashes = fingerprint_inputs(files)
    cfg_hash = data_config_hash(cfg)
    fingerprint = combined_fingerprint(input_hashes, tok_fp, cfg_hash)
    existing = existing_complete_manifest(Path(cfg.output), fingerprint)
    if existing is not None and not _augmented_tokenizer_intact(Path(cfg.output), existing):
        existing = None
    return Plan(files, tok_fp, input_hashes, cfg_hash, fingerprint, existing)


def _augmented_tokenizer_intact(output: Path, manifest: dict) -> bool:
    """A finished output that ships its own (augmented) tokenizer is complete only with it intact."""
    info = manifest.get("tokenizer", {})
    if "augmented_from" not in info:
        return True
    tok_dir = output / AUGMENTED_TOKENIZER_DIR
    return tok_dir.is_dir() and tokenizer_fingerprint(tok_dir) == info.get("fingerprint")


def _save_augmented_tokenizer(tok, source: str, output: Path) -> Path:
    """Write ``tok`` (source plus the default chat template) to OUTPUT/tokenizer, atomically."""
    dst = output / AUGMENTED_TOKENIZER_DIR
    if dst.resolve() == Path(source).resolve():
        raise DataError(f"data.tokenizer: {source} is where data prepare writes its augmented "
                        "tokenizer; point data.tokenizer or data.output elsewhere")  # fmt: skip
    tmp = output / f".{AUGMENTED_TOKENIZER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def prepare(
    cfg: DataConfig, tokenizer_path: str, progress: bool = True, plan: Plan | None = None
) -> PrepareResult:
    """Run the whole data job; skips when ``cfg.output`` already holds this exact result."""
    start = time.perf_counter()
    plan = plan or plan_prepare(cfg, tokenizer_path)
    output = Path(cfg.output)
    if plan.existing is not None:
        log.info("data prepare: %s is complete for these inputs and config; skipping", output)
        return PrepareResult(
            output, plan.existing, skipped=True, seconds=time.perf_counter() - start
        )
    tok = load_tokenizer(tokenizer_path)
    source, added = None, []
    if cfg.mode != "pretrain" and not tok.chat_template:
        # Any HF tokenizer can do SFT: it gets raylm's template (and the tokens it needs);
        # training, export and eval then use this copy, named in the manifest.
        source, added = tokenizer_path, add_default_chat_template(tok)
    check_tokenizer(tok, cfg.mode, tokenizer_path)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    _clear_outputs(output)
    if source is not None:
        tokenizer_path = str(_save_augmented_tokenizer(tok, source, output))
        log.warning("data prepare: tokenizer %s has no chat template; using raylm's default "
                    "template, added tokens %s (new vocabulary size %d); saved to %s",
                    source, added, len(tok), tokenizer_path)  # fmt: skip
    with _scoped_data_context(cfg):
        ds = _build_dataset(cfg, plan.files, tokenizer_path, tok.eos_token_id)
        try:
            writers, tally = _pack_and_write(ds, cfg, output, pad_id, progress)
        except Exception as exc:
            err = _unwrap_data_error(exc)
            if err is None:
                raise
            raise DataError(str(err)) from None
    _report_rejections(tally)
    manifest = _manifest(cfg, plan, tally, writers, tok, pad_id, tokenizer_path)
    if source is not None:
        manifest["tokenizer"] = {
            "path": str(Path(tokenizer_path).resolve()),
            "fingerprint": tokenizer_fingerprint(tokenizer_path),
            "augmented_from": manifest["tokenizer"] | {"path": str(Path(source).resolve())},
            "added_tokens": added,
        }
    write_manifest(output, manifest)
    return PrepareResult(output, manifest, seconds=time.perf_counter() - start)


def _report_rejections(tally: _Tally) -> None:
    for reason, where in sorted(tally.samples.items()):
        log.warning(
            "data prepare: %d record(s) rejected as %s, e.g. %s",
            tally.rejected[reason],
            reason,
            ", ".join(where),
        )
    if tally.kept == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(tally.rejected.items())) or "none"
        raise DataError(
            f"data.inputs: no documents left from {tally.read} records read (rejected: {reasons})"
        )


def _manifest(cfg: DataConfig, plan: Plan, tally: _Tally, writers, tok, pad_id, tokenizer_path):
    output = Path(cfg.output)
    return build_manifest(
        mode=cfg.mode,
        packed=cfg.mode == "pretrain" or cfg.sft.pack,  # several documents per row
        documents_read=tally.read,
        documents_kept=tally.kept,
        rejected=dict(sorted(tally.rejected.items())),
        rejected_samples=tally.samples,
        truncated=tally.truncated,
        pii_redacted=dict(sorted(tally.pii.items())),
        tokens=sum(w.tokens for w in writers.values()),
        seq_len=cfg.seq_len,
        pad_token_id=pad_id,
        eos_token_id=tok.eos_token_id,
        splits={
            s: {
                "rows": w.rows,
                "tokens": w.tokens,
                "files": w.files,
                "layout": w.layout,
                **({"arrays": w.arrays} if w.arrays else {}),
            }
            for s, w in writers.items()
        },  # fmt: skip
        checksums={f"{s}/{n}": h for s, w in writers.items() for n, h in w.checksums.items()},
        file_sizes={
            f"{s}/{n}": (output / s / n).stat().st_size
            for s, w in writers.items()
            for n in w.files + w.arrays
        },
        tokenizer={
            "path": str(Path(tokenizer_path).resolve()),
            "fingerprint": plan.tokenizer_fingerprint,
        },
        inputs=plan.input_hashes,
        config_hash=plan.config_hash,
        fingerprint=plan.fingerprint,
    )


def summarize(result: PrepareResult) -> str:
    """One screen: counts, rejections with sample locations, splits, where the output is."""
    m = result.manifest
    lines = [
        f"data prepare: {result.output}"
        + ("  (already complete: skipped)" if result.skipped else ""),
        f"  documents: {m['documents_read']} read, {m['documents_kept']} kept",
    ]
    for reason, count in m["rejected"].items():
        where = ", ".join(m.get("rejected_samples", {}).get(reason, []))
        lines.append(f"  rejected {reason}: {count}" + (f"  (e.g. {where})" if where else ""))
    if m.get("truncated"):
        lines.append(f"  truncated conversations: {m['truncated']}")
    for kind, count in m.get("pii_redacted", {}).items():
        lines.append(f"  redacted {kind}: {count}")
    tok = m.get("tokenizer", {})
    if "augmented_from" in tok:
        lines.append(f"  tokenizer: {tok['augmented_from']['path']} had no chat template; wrote "
                     f"{tok['path']} with raylm's default (added {tok['added_tokens']})")  # fmt: skip
    lines.append(f"  tokens kept: {m['tokens']} (seq_len {m['seq_len']}, padding excluded)")
    for split, info in m["splits"].items():
        lines.append(
            f"  {split}: {info['rows']} rows, {info['tokens']} tokens, {len(info['files'])} files"
        )
    if not result.skipped:
        lines.append(f"  took {result.seconds:.1f}s")
    return "\n".join(lines)
