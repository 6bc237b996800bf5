"""Finding input shards and turning one shard's bytes into records, line by line.

pyarrow's JSON reader drops a whole file on one malformed line, so jsonl is parsed here line by line:
every bad record is counted with its ``file:line`` and the rest of the file survives. Tables
(parquet, Hugging Face arrow) are read row by row the same way. Chat and preference records are
turned into one shape here (``formats``, ``preference``), so a bad one is counted where it was read.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_pipelines.errors import DataError
from data_pipelines.formats import RecordFields, RecordProblem, to_messages
from data_pipelines.hf_dirs import (
    hub_snapshot,
    is_saved_dataset,
    read_arrow,
    saved_dataset_files,
    select_split,
)
from data_pipelines.preference import split_preference

__all__ = ["InputFiles", "Record", "detect_format", "expand_inputs", "parse_file", "STRICT_REASONS"]

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
    ".txt.gz": "text",
    ".text": "text",
    ".md": "text",
}

# Formats whose records have fields (all but plain text).
_RECORD_FORMATS = frozenset({"jsonl", "parquet", "arrow"})

# Bad input (as opposed to policy filters like too_short or duplicate): strict mode stops on these.
STRICT_REASONS = frozenset(
    {
        "malformed_json",
        "missing_text",
        "invalid_utf8",
        "invalid_messages",
        "last_turn_not_assistant",
        "empty_file",
        "unknown_format",
        "missing_field",
        "unknown_role",
        "malformed_preference",
        "history_mismatch",
        "empty_answer",
        "identical_answers",
        # found at tokenization, against the chat template
        "system_not_supported",
        "tool_not_supported",
        "chat_template_error",
    }
)


@dataclass(frozen=True)
class InputFiles:
    """Resolved input shards, sorted by path so listing order never changes the output."""

    paths: list[str]  # as the filesystem wants them (no scheme for s3)
    display: dict[str, str]  # filesystem path -> what the user wrote (with s3://)
    filesystem: pafs.FileSystem | None  # None: local


@dataclass
class Record:
    source: str  # "file:line" (1-based) or "file:row" for parquet
    payload: str | list | dict | None  # text; sft: messages; preference: prompt/chosen/rejected
    reason: str = ""  # empty when the record is usable
    detail: str = ""  # which field is wrong and how, for reasons that name one


def detect_format(path: str, fmt: str = "auto") -> str | None:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    return None


def _s3_filesystem(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint_url:
        scheme, _, host = endpoint_url.partition("://")
        kwargs.update(endpoint_override=host or endpoint_url, scheme=scheme if host else "https")
    if region:
        kwargs["region"] = region
    # Credentials from the submitting environment travel with the filesystem object to the Ray
    # workers (whose environment may lack them); without them, workers use their own chain
    # (instance role, ~/.aws) as usual.
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def _list_s3(fs: pafs.FileSystem, spec: str, where: str) -> list[str]:
    path = spec[len("s3://") :]
    if any(c in path for c in "*?["):
        base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return [i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, path)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [path]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return [i.path for i in infos if i.is_file]
    raise DataError(f"{where}: {spec}: no such object or prefix")


def _walk(top: str, split: str, where: str) -> list[str]:
    """Files below ``top``; a ``save_to_disk`` dataset inside counts by its own shard list."""
    found = []
    for root, dirs, files in os.walk(top):
        if is_saved_dataset(root):
            found += saved_dataset_files(root, split, where)
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, f) for f in files if not f.startswith(".")]
    return found


def _list_local(spec: str, where: str, split: str) -> list[str]:
    if any(c in spec for c in "*?["):
        return [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    if os.path.isfile(spec):
        return [spec]
    snapshot = hub_snapshot(spec) if os.path.isdir(spec) else None
    if snapshot:
        # A hub repo's files: its data files of one split, not its README or scripts.
        data = [p for p in _walk(snapshot, split, where) if detect_format(p) in _RECORD_FORMATS]
        return select_split(data, snapshot, split, where)
    if os.path.isdir(spec):
        return _walk(spec, split, where)
    raise DataError(f"{where}: {spec}: no such file or directory")


def expand_inputs(
    specs: list[str],
    fmt: str = "auto",
    endpoint_url: str | None = None,
    region: str | None = None,
    hf_split: str = "train",
) -> InputFiles:
    """Resolve files, directories, globs and s3:// URIs into a sorted list of shard paths.

    Local Hugging Face dataset dirs (``save_to_disk`` output, hub cache snapshots) give the shards
    of their ``hf_split``; see ``hf_dirs``."""
    if not specs:
        raise DataError("data.inputs: empty; name at least one file, directory, glob or s3:// URI")
    remote = [s.startswith("s3://") for s in specs]
    if any(remote) and not all(remote):
        raise DataError("data.inputs: mix of s3:// and local inputs; prepare them separately")
    fs = _s3_filesystem(endpoint_url, region) if all(remote) else None
    display: dict[str, str] = {}
    for i, spec in enumerate(specs):
        where = f"data.inputs[{i}]"
        listed = _list_s3(fs, spec, where) if fs is not None else _list_local(spec, where, hf_split)
        explicit = len(listed) == 1 and listed[0].rstrip("/") == spec.removeprefix("s3://")
        for path in listed:
            if detect_format(path, fmt) is None:
                if explicit:
                    raise DataError(f"{where}: {spec}: unknown format; set data.format")
                continue
            local = path if fs is not None else os.path.abspath(path)
            display[local] = f"s3://{path}" if fs is not None else path
    if not display:
        raise DataError(f"data.inputs: no input files found in {specs}")
    return InputFiles(paths=sorted(display), display=display, filesystem=fs)


def _decompress(path: str, data: bytes) -> bytes:
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def _as_text(obj: dict, fields: RecordFields) -> str | None:
    """A chat record's text for tokenizer training: its messages' contents, or None."""
    try:
        messages = to_messages(obj, replace(fields, mode="sft", format="auto"))
    except RecordProblem:
        return None
    return "\n".join(m["content"] for m in messages)


def _from_object(obj: object, source: str, fields: RecordFields, messages_as_text: bool) -> Record:
    if fields.mode == "pretrain":
        if not isinstance(obj, dict):
            return Record(source, None, "malformed_json")
        value = obj.get(fields.text)
        if not isinstance(value, str) and messages_as_text:
            value = _as_text(obj, fields)
        if not isinstance(value, str):
            return Record(source, None, "missing_text")
        return Record(source, value)
    try:
        if fields.mode == "preference":
            return Record(source, split_preference(obj, fields).as_dict())
        return Record(source, to_messages(obj, fields))
    except RecordProblem as problem:
        return Record(source, None, problem.reason, problem.detail)


def _parse_jsonl(
    name: str, data: bytes, fields: RecordFields, messages_as_text: bool
) -> Iterator[Record]:
    # BytesIO yields one line at a time: no list of every line of the shard.
    for lineno, raw in enumerate(io.BytesIO(data), start=1):
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue
        source = f"{name}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield Record(source, None, "invalid_utf8")
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            yield Record(source, None, "malformed_json")
            continue
        yield _from_object(obj, source, fields, messages_as_text)


def _parse_table(name: str, table: pa.Table, fields: RecordFields) -> Iterator[Record]:
    """Rows of a parquet or arrow table; chat and preference rows as records of their columns."""
    if fields.mode == "pretrain":
        if fields.text not in table.column_names:
            for row in range(table.num_rows):
                yield Record(f"{name}:{row + 1}", None, "missing_text")
            return
        for row, value in enumerate(table.column(fields.text).to_pylist(), start=1):
            yield _from_object({fields.text: value}, f"{name}:{row}", fields, False)
        return
    # Only the columns a record format can use: a table may carry large unrelated ones.
    used = [c for c in table.column_names if c in fields.columns()]
    if not used:  # every row is rejected the same way, naming the columns the table has
        placeholder = {c: "" for c in table.column_names}
        for row in range(1, table.num_rows + 1):
            yield _from_object(placeholder, f"{name}:{row}", fields, False)
        return
    row = 0
    for batch in table.select(used).to_batches(max_chunksize=1024):
        for obj in batch.to_pylist():
            row += 1
            yield _from_object(obj, f"{name}:{row}", fields, False)


def _read_table(name: str, data: bytes, fmt: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(data)) if fmt == "parquet" else read_arrow(data)
    except (OSError, pa.ArrowInvalid) as exc:  # not a parquet / arrow file at all
        raise DataError(f"{name}: not a readable {fmt} file: {exc}") from None


def _parse_text(name: str, data: bytes, unit: str) -> Iterator[Record]:
    if unit == "file":
        try:
            yield Record(f"{name}:1", data.decode("utf-8"))
        except UnicodeDecodeError:
            yield Record(f"{name}:1", None, "invalid_utf8")
        return
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield Record(f"{name}:{lineno}", raw.decode("utf-8"))
        except UnicodeDecodeError:
            yield Record(f"{name}:{lineno}", None, "invalid_utf8")


def parse_file(
    name: str,
    data: bytes,
    fmt: str,
    fields: RecordFields | None = None,
    text_unit: str = "file",
    messages_as_text: bool = False,
) -> Iterator[Record]:
    """Records of one shard in file order. ``name`` is what errors and samples show.

    ``fields``: the record mode (pretrain text, sft chat, preference pairs) and field names.
    ``messages_as_text``: a jsonl record without the text field but with a valid chat record
    yields its contents joined by newlines (tokenizer training reads both kinds of corpus).
    """
    fields = fields or RecordFields()
    data = _decompress(name, data)
    if not data.strip():
        yield Record(name, None, "empty_file")
        return
    fmt = detect_format(name, fmt) or "text"
    if fmt == "jsonl":
        yield from _parse_jsonl(name, data, fields, messages_as_text)
    elif fmt in ("parquet", "arrow"):
        yield from _parse_table(name, _read_table(name, data, fmt), fields)
    else:
        if fields.mode != "pretrain":
            raise DataError(f"{name}: plain text cannot hold chat or preference records "
                            f"(data.mode={fields.mode})")  # fmt: skip
        yield from _parse_text(name, data, text_unit)
