"""The runtime env raylm ships for ``ray job submit`` / ``JobSubmissionClient``.

Code travels as the job's ``working_dir`` (Ray unpacks it on every node the job touches and puts it on
``PYTHONPATH``); the heavy dependencies (ray, torch, deepspeed, transformers) come from the node image,
which must match the submitting machine's versions (``raylm doctor`` compares them per node).
``cluster/runtime_env.yaml`` is the same env for the CLI::

    ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml \\
        --working-dir . -- raylm train configs/quickstart.yaml

Uploads are checked before they leave: the working dir after excludes (and ``.gitignore`` /
``.rayignore``, as Ray applies them) must stay under :data:`UPLOAD_LIMIT_BYTES`.
The auth token never goes into a runtime env: Ray stores runtime envs in the GCS and shows them in the
dashboard. Jobs inherit ``RAY_AUTH_MODE`` / the token from the nodes' environment instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_EXCLUDES",
    "SECRET_ENV_VARS",
    "UPLOAD_LIMIT_BYTES",
    "UploadSize",
    "UploadTooLarge",
    "build_runtime_env",
    "check_upload_size",
    "upload_size",
]

MIB = 1024 * 1024
# Ray's documented working_dir cap. Ray 2.60's hard limit is the gRPC message size (512 MiB,
# `GCS_STORAGE_MAX_SIZE`), checked only after zipping; we stop far earlier and say why.
UPLOAD_LIMIT_BYTES = 100 * MIB

# gitwildmatch patterns relative to the working dir (Ray's `excludes` syntax). Keep in sync with
# cluster/runtime_env.yaml (a unit test compares them).
DEFAULT_EXCLUDES = [
    ".git",
    ".venv",
    "venv",
    "runs",
    "data",
    "bench/out",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "*.parquet",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.jsonl.gz",
]

# Worker-side settings every job needs (see cluster.ray_env.WORKER_ENV for why).
JOB_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false"}

# Never shipped in a runtime env: Ray keeps runtime envs in the GCS and the dashboard shows them.
SECRET_ENV_VARS = ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")


# Ray's walker logs every ignore file it honours at INFO; the caller reports the outcome instead.
_QUIET = logging.getLogger("raylm.runtime_env.walk")
_QUIET.setLevel(logging.WARNING)


class UploadTooLarge(ValueError):
    """The working dir would exceed the upload limit; the message names the biggest files."""


@dataclass
class UploadSize:
    root: Path
    total_bytes: int = 0
    files: int = 0
    largest: list[tuple[int, str]] = field(default_factory=list)  # (bytes, path relative to root)

    def describe(self) -> str:
        return f"{self.root}: {self.total_bytes / MIB:.1f} MiB in {self.files} files after excludes"


def upload_size(working_dir: str | Path, excludes: Iterable[str] = DEFAULT_EXCLUDES) -> UploadSize:
    """Bytes Ray would upload from ``working_dir``: the same walk and exclude rules as Ray's packer.

    The sum of file sizes is an upper bound on the zip Ray uploads (zip only compresses).
    """
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(working_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"working_dir {root} is not a directory")
    out = UploadSize(root)

    def handler(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            out.total_bytes += size
            out.files += 1
            out.largest.append((size, str(path.relative_to(root))))

    # Ray honours .gitignore unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 (ray#45602).
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    _dir_travel(root, [_get_excludes(root, list(excludes))], handler, include_gitignore,
                logger=_QUIET)  # fmt: skip
    out.largest = sorted(out.largest, reverse=True)[:5]
    return out


def check_upload_size(
    working_dir: str | Path,
    excludes: Iterable[str] = DEFAULT_EXCLUDES,
    limit_bytes: int = UPLOAD_LIMIT_BYTES,
) -> UploadSize:
    """``upload_size``, raising :class:`UploadTooLarge` above ``limit_bytes``."""
    size = upload_size(working_dir, excludes)
    if size.total_bytes > limit_bytes:
        biggest = ", ".join(f"{rel} ({n / MIB:.1f} MiB)" for n, rel in size.largest)
        raise UploadTooLarge(
            f"job working_dir {size.describe()}, over the {limit_bytes / MIB:.0f} MiB upload limit. "
            f"Largest files: {biggest}. Add them to `excludes` (runtime env), .gitignore or "
            ".rayignore, and keep datasets, checkpoints and models on shared storage (s3:// or NFS)."
        )
    return size


def build_runtime_env(
    working_dir: str | Path = ".",
    excludes: Iterable[str] = (),
    env_vars: dict[str, str] | None = None,
    limit_bytes: int = UPLOAD_LIMIT_BYTES,
) -> dict[str, Any]:
    """The runtime env for a raylm job, after checking the upload size.

    ``excludes`` add to :data:`DEFAULT_EXCLUDES`; ``env_vars`` add to the job's worker settings and
    may not carry secrets (:data:`SECRET_ENV_VARS`).
    """
    env = {**JOB_ENV_VARS, **(env_vars or {})}
    secrets = sorted(k for k in env if k in SECRET_ENV_VARS)
    if secrets:
        raise ValueError(
            f"runtime env env_vars: {', '.join(secrets)} must not go into a runtime env (Ray stores "
            "it in the GCS and the dashboard shows it); set it in the nodes' environment instead"
        )
    all_excludes = list(dict.fromkeys([*DEFAULT_EXCLUDES, *excludes]))
    size = check_upload_size(working_dir, all_excludes, limit_bytes)
    return {"working_dir": str(size.root), "excludes": all_excludes, "env_vars": env}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cluster.runtime_env",
        description="Check a job's upload size and print raylm's runtime env as JSON "
        "(for `ray job submit --runtime-env-json`).",
    )
    p.add_argument("working_dir", nargs="?", default=".")
    args = p.parse_args(argv)
    try:
        size = check_upload_size(args.working_dir)
        env = build_runtime_env(args.working_dir)
    except (UploadTooLarge, FileNotFoundError) as exc:
        print(f"raylm runtime env: {exc}", file=sys.stderr)
        return 1
    print(f"upload {size.describe()} (limit {UPLOAD_LIMIT_BYTES // MIB} MiB)", file=sys.stderr)
    print(json.dumps(env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
