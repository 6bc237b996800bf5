"""Hugging Face datasets on local disk, found and read without the ``datasets`` package.

Two layouts, both local and offline:

- ``Dataset.save_to_disk(DIR)``: ``DIR/state.json`` lists the shards in order (``_data_files``:
  ``data-00000-of-0000N.arrow``, Arrow IPC *stream* files written by ``datasets``' ArrowWriter)
  next to ``DIR/dataset_info.json``. A ``DatasetDict`` writes ``DIR/dataset_dict.json``
  (``{"splits": [...]}``) and one such directory per split; the split ``data.hf_split`` is read.
- A hub cache snapshot (``.../datasets--ORG--NAME/snapshots/COMMIT/``, the repo's own parquet or
  jsonl files as symlinks into ``../../blobs/``): read like any other shards. When file or
  directory names say which split they hold (``datasets``' convention: ``train-00000-of-00002``,
  ``data/test.jsonl``, a ``validation/`` dir), only the ``data.hf_split`` ones are kept; the
  dataset card (README.md) is not data. The repo dir itself resolves through ``refs/main``.
"""

from __future__ import annotations

import json
import os
import re

import pyarrow as pa

from data_pipelines.errors import DataError

__all__ = [
    "SPLIT_KEYWORDS",
    "hub_snapshot",
    "is_saved_dataset",
    "read_arrow",
    "saved_dataset_files",
    "select_split",
]

DATASET_DICT_JSON = "dataset_dict.json"
DATASET_INFO_JSON = "dataset_info.json"
STATE_JSON = "state.json"
# datasets' data_files.py: the words that put a file into a split, and what may surround them.
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = "-._ 0-9"


def is_saved_dataset(path: str) -> bool:
    """A ``save_to_disk`` dir: a DatasetDict's json, or a Dataset's state and info files."""

    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(path, name))

    return has(DATASET_DICT_JSON) or (has(STATE_JSON) and has(DATASET_INFO_JSON))


def _read_json(path: str, where: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"{where}: {path}: unreadable: {exc}") from None


def saved_dataset_files(root: str, split: str, where: str) -> list[str]:
    """The arrow shards of a ``save_to_disk`` dir (of its ``split`` for a DatasetDict)."""
    dict_json = os.path.join(root, DATASET_DICT_JSON)
    if os.path.isfile(dict_json):
        splits = _read_json(dict_json, where).get("splits", [])
        if split not in splits:
            raise DataError(f"{where}: {root} holds the splits {splits}; set data.hf_split to "
                            f"one of them (it is {split!r})")  # fmt: skip
        return saved_dataset_files(os.path.join(root, split), split, where)
    state = _read_json(os.path.join(root, STATE_JSON), where)
    files = [os.path.join(root, d["filename"]) for d in state.get("_data_files", [])]
    missing = [p for p in files if not os.path.isfile(p)]
    if missing or not files:
        raise DataError(f"{where}: {root}: state.json lists {len(files)} arrow files, "
                        f"missing: {[os.path.basename(p) for p in missing] or 'all'}")  # fmt: skip
    return files


def hub_snapshot(path: str) -> str | None:
    """The snapshot dir when ``path`` is a hub cache snapshot or repo dir, else None."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == "snapshots" and os.path.isdir(
        os.path.join(os.path.dirname(parent), "blobs")
    ):
        return path
    ref = os.path.join(path, "refs", "main")
    if os.path.isdir(os.path.join(path, "snapshots")) and os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
        snapshot = os.path.join(path, "snapshots", commit)
        return snapshot if os.path.isdir(snapshot) else None
    return None


def _split_pattern(keyword: str) -> re.Pattern:
    return re.compile(rf"(^|[{_SEP}]){re.escape(keyword)}([{_SEP}]|$)")


def _names_split(relpath: str, split: str) -> bool:
    keywords = SPLIT_KEYWORDS.get(split, (split,))
    parts = relpath.replace(os.sep, "/").split("/")
    return any(_split_pattern(k).search(p) for k in keywords for p in parts)


def select_split(files: list[str], root: str, split: str, where: str) -> list[str]:
    """The files whose path below ``root`` names ``split``; all of them when none names a split."""
    rel = {p: os.path.relpath(p, root) for p in files}
    splits = {s for s in {*SPLIT_KEYWORDS, split} for r in rel.values() if _names_split(r, s)}
    if not splits:
        return files
    if split not in splits:
        raise DataError(f"{where}: {root} has the splits {sorted(splits)}; set data.hf_split to "
                        f"one of them (it is {split!r})")  # fmt: skip
    return [p for p in files if _names_split(rel[p], split)]


def read_arrow(data: bytes) -> pa.Table:
    """An Arrow IPC stream (what ``datasets`` writes) or file, as one table."""
    try:
        return pa.ipc.open_stream(pa.BufferReader(data)).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.BufferReader(data)).read_all()
