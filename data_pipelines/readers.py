"""Finding input shards and turning one shard's bytes into records, line by line.

pyarrow's JSON reader drops a whole file on one malformed line, so jsonl is parsed here line by line:
every bad record is counted with its ``file:line`` and the rest of the file survives.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from data_pipelines.errors import DataError

__all__ = ["InputFiles", "Record", "detect_format", "expand_inputs", "parse_file", "STRICT_REASONS"]

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
    ".text": "text",
    ".md": "text",
}

# Bad input (as opposed to policy filters like too_short or duplicate): strict mode stops on these.
STRICT_REASONS = frozenset(
    {
        "malformed_json",
        "missing_text",
        "invalid_utf8",
        "invalid_messages",
        "last_turn_not_assistant",
        "empty_file",
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
    payload: str | list | None  # text, or the messages list in sft mode
    reason: str = ""  # empty when the record is usable


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


def _list_local(spec: str, where: str) -> list[str]:
    if any(c in spec for c in "*?["):
        return [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        found = []
        for root, dirs, files in os.walk(spec):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [os.path.join(root, f) for f in files if not f.startswith(".")]
        return found
    raise DataError(f"{where}: {spec}: no such file or directory")


def expand_inputs(
    specs: list[str], fmt: str = "auto", endpoint_url: str | None = None, region: str | None = None
) -> InputFiles:
    """Resolve files, directories, globs and s3:// URIs into a sorted list of shard paths."""
    if not specs:
        raise DataError("data.inputs: empty; name at least one file, directory, glob or s3:// URI")
    remote = [s.startswith("s3://") for s in specs]
    if any(remote) and not all(remote):
        raise DataError("data.inputs: mix of s3:// and local inputs; prepare them separately")
    fs = _s3_filesystem(endpoint_url, region) if all(remote) else None
    display: dict[str, str] = {}
    for i, spec in enumerate(specs):
        where = f"data.inputs[{i}]"
        listed = _list_s3(fs, spec, where) if fs is not None else _list_local(spec, where)
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


def _messages_problem(value: object) -> str:
    """'' for a usable conversation, else the rejection reason.

    The last turn must be the assistant's: SFT learns the replies, and a conversation that ends on
    a user turn has an unanswered prompt at its end (usually a truncated or mis-exported record).
    """
    if not isinstance(value, list) or not value:
        return "invalid_messages"
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "invalid_messages"
        if m.get("role") not in ("system", "user", "assistant"):
            return "invalid_messages"
    return "" if value[-1]["role"] == "assistant" else "last_turn_not_assistant"


def _from_object(
    obj: object, source: str, field: str, sft: bool, fallback: str | None = None
) -> Record:
    if not isinstance(obj, dict):
        return Record(source, None, "malformed_json")
    value = obj.get(field)
    if (not sft and not isinstance(value, str) and fallback
            and not _messages_problem(obj.get(fallback))):  # fmt: skip
        # Tokenizer training reads chat records too: their text is the messages' contents.
        return Record(source, "\n".join(m["content"] for m in obj[fallback]))
    if sft:
        problem = _messages_problem(value)
        return Record(source, None, problem) if problem else Record(source, value)
    if not isinstance(value, str):
        return Record(source, None, "missing_text")
    return Record(source, value)


def _parse_jsonl(
    name: str, data: bytes, field: str, sft: bool, fallback: str | None
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
        yield _from_object(obj, source, field, sft, fallback)


def _parse_parquet(name: str, data: bytes, field: str, sft: bool) -> Iterator[Record]:
    table = pq.read_table(io.BytesIO(data))
    if field not in table.column_names:
        reason = "invalid_messages" if sft else "missing_text"
        for row in range(table.num_rows):
            yield Record(f"{name}:{row + 1}", None, reason)
        return
    for row, value in enumerate(table.column(field).to_pylist(), start=1):
        yield _from_object({field: value}, f"{name}:{row}", field, sft)


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
    text_field: str = "text",
    messages_field: str = "messages",
    sft: bool = False,
    text_unit: str = "file",
    messages_as_text: bool = False,
) -> Iterator[Record]:
    """Records of one shard in file order. ``name`` is what errors and samples show.

    ``messages_as_text``: a jsonl record without the text field but with valid chat messages yields
    their contents joined by newlines (tokenizer training reads both kinds of corpus).
    """
    data = _decompress(name, data)
    if not data.strip():
        yield Record(name, None, "empty_file")
        return
    fmt = detect_format(name, fmt) or "text"
    field = messages_field if sft else text_field
    if fmt == "jsonl":
        fallback = messages_field if messages_as_text else None
        yield from _parse_jsonl(name, data, field, sft, fallback)
    elif fmt == "parquet":
        try:
            yield from _parse_parquet(name, data, field, sft)
        except OSError as exc:  # not a parquet file at all
            raise DataError(f"{name}: not a readable parquet file: {exc}") from None
    else:
        if sft:
            raise DataError(f"{name}: plain text cannot hold chat messages (data.mode=sft)")
        yield from _parse_text(name, data, text_unit)
