"""``manifest.json``: what a prepared dataset holds, and the fingerprint that decides re-runs.

The fingerprint covers every input byte (sha256 per shard), the tokenizer files and the config keys
that can change the output. A re-run with an equal fingerprint and every listed file intact is
skipped; anything else (a partial output, one changed input byte) is rebuilt. The manifest is
written last, so an interrupted run never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_pipelines.config import DataConfig
from data_pipelines.readers import InputFiles

__all__ = [
    "MANIFEST_NAME",
    "build_manifest",
    "data_config_hash",
    "existing_complete_manifest",
    "fingerprint_inputs",
]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
# Keys that change how fast or where the job runs, never what it writes.
_OUTPUT_NEUTRAL = {
    "inputs",
    "output",
    "tokenizer",
    "strict",
    "s3",
    "num_actors",
    "actor_cpus",
    "actor_restarts",
    "batch_size",
    "block_size_mb",
    "object_store_mb",
}


def data_config_hash(cfg: DataConfig) -> str:
    data = cfg.model_dump(mode="json", exclude=_OUTPUT_NEUTRAL)
    data["dedup"].pop("partitions", None)
    data["format_version"] = FORMAT_VERSION
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _sha256_stream(files: InputFiles, path: str) -> str:
    h = hashlib.sha256()
    fs = files.filesystem
    with open(path, "rb") if fs is None else fs.open_input_stream(path) as f:  # noqa: SIM115
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_inputs(files: InputFiles, threads: int | None = None) -> dict[str, str]:
    """sha256 of every input shard, keyed by the name the user sees. hashlib releases the GIL on
    large updates, so threads overlap the reads and the hashing."""
    workers = threads or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(lambda p: _sha256_stream(files, p), files.paths))
    return {files.display[p]: d for p, d in zip(files.paths, digests, strict=True)}


def combined_fingerprint(input_hashes: dict[str, str], tokenizer_fp: str, config_hash: str) -> str:
    # Shard names are left out on purpose: moving a corpus does not change what it holds. Their
    # sorted order is what the pipeline reads in, so it is part of the content.
    ordered = [input_hashes[k] for k in sorted(input_hashes)]
    blob = json.dumps({"inputs": ordered, "tokenizer": tokenizer_fp, "config": config_hash})
    return hashlib.sha256(blob.encode()).hexdigest()


def existing_complete_manifest(output: Path, fingerprint: str) -> dict | None:
    """The manifest of a finished run with this fingerprint whose files are all present, else None."""
    path = output / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for split, info in manifest.get("splits", {}).items():
        for name in info.get("files", []) + info.get("arrays", []):
            f = output / split / name
            if not f.is_file() or f.stat().st_size != manifest["file_sizes"].get(f"{split}/{name}"):
                return None
    return manifest


def build_manifest(**fields) -> dict:
    return {"format_version": FORMAT_VERSION, **fields}


def write_manifest(output: Path, manifest: dict) -> Path:
    tmp = output / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, output / MANIFEST_NAME)
    return output / MANIFEST_NAME
