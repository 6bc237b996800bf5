"""Is ``train.storage_path`` shared by every node? Decided by a probe, never by the path's form.

Multi-node Ray Train needs a storage path every node reaches (NFS-style mount or ``s3://``): workers
write checkpoint shards there and Ray merges them; a node-local path fails only at the first
checkpoint (ray#37177), or silently leaves shards on one node. The probe runs two rounds of Ray tasks,
each pinned to one alive node (``NodeAffinitySchedulingStrategy(soft=False)``): every node writes a
file named after itself, then every node reads every file. Local paths and URIs (``s3://``) go
through ``pyarrow.fs``, the same filesystem layer Ray Train uses for ``storage_path``; an S3 run
passes the filesystem object it trains with (endpoint, credentials), so that is what is probed.

:func:`judge_probe` is the pure verdict on the probe's results (unit-tested);
:func:`require_shared_storage` is what ``raylm train`` calls on a multi-node cluster.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "NodeProbe",
    "ProbeResult",
    "StorageNotShared",
    "alive_nodes",
    "judge_probe",
    "probe_storage",
    "require_shared_storage",
    "storage_uri",
]

PROBE_DIR = ".raylm_storage_probe"
ADVICE = (
    "multi-node training writes checkpoints from every node to this path: use a filesystem mounted at "
    "the same path on every node (NFS, EFS, Filestore, a Kubernetes ReadWriteMany volume) or an "
    "object store URI (s3://bucket/prefix)"
)


class StorageNotShared(RuntimeError):
    """The storage path is not writable and readable from every node; the message says which."""


@dataclass
class NodeProbe:
    """One node's view: whether it could write its own file, and which nodes' files it could read."""

    node_id: str
    label: str  # e.g. "10.0.0.5 (head)"; for messages
    write_error: str | None = None
    # writer node_id -> error text, for files this node could not read back intact
    read_errors: dict[str, str] = field(default_factory=dict)


@dataclass
class ProbeResult:
    path: str
    nodes: list[NodeProbe]


def storage_uri(path: str) -> str:
    """``s3://...`` and other URIs unchanged; a local path made absolute (as raylm train does)."""
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def judge_probe(result: ProbeResult) -> str | None:
    """None when every node wrote its file and read every other node's; else the explanation."""
    by_id = {n.node_id: n for n in result.nodes}
    problems = []
    for n in result.nodes:
        if n.write_error:
            problems.append(f"{n.label} cannot write there ({n.write_error})")
    for reader in result.nodes:
        missing = [
            by_id[w].label
            for w in reader.read_errors
            if w in by_id and not by_id[w].write_error and w != reader.node_id
        ]
        if missing:
            problems.append(
                f"{reader.label} does not see the files written by {', '.join(missing)}"
            )
        if reader.node_id in reader.read_errors and not reader.write_error:
            problems.append(f"{reader.label} cannot read back its own file")
    if not problems:
        return None
    return (
        f"train.storage_path {result.path!r} is not shared by the {len(result.nodes)} nodes of this "
        f"cluster: {'; '.join(problems)}"
    )


# ---------------------------------------------------------------- Ray edge


def _open(target: Any) -> tuple[Any, str]:
    """(filesystem, base path) of a URI or local path, or a (filesystem, path) pair as given."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(target) if isinstance(target, str) else target


def _write(uri: Any, name: str, payload: bytes) -> str | None:
    try:
        fs, base = _open(uri)
        fs.create_dir(f"{base}/{PROBE_DIR}", recursive=True)
        with fs.open_output_stream(f"{base}/{PROBE_DIR}/{name}") as f:
            f.write(payload)
    except Exception as exc:  # any failure is the answer we report
        return f"{type(exc).__name__}: {exc}"
    return None


def _read(uri: Any, expected: dict[str, bytes]) -> dict[str, str]:
    """name -> error for every expected file not readable with the expected bytes."""
    errors = {}
    try:
        fs, base = _open(uri)
    except Exception as exc:
        return {name: f"{type(exc).__name__}: {exc}" for name in expected}
    for name, payload in expected.items():
        try:
            with fs.open_input_stream(f"{base}/{PROBE_DIR}/{name}") as f:
                got = f.read()
            if got != payload:
                errors[name] = "different content"
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def _cleanup(uri: Any, names: list[str]) -> None:
    fs, base = _open(uri)
    for name in names:
        # Already gone when another node deleted the shared copy.
        with contextlib.suppress(Exception):
            fs.delete_file(f"{base}/{PROBE_DIR}/{name}")


def alive_nodes() -> list[dict[str, Any]]:
    """Alive nodes of the connected cluster that can run tasks, head first."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: "node:__internal_head__" not in n.get("Resources", {}))


def _label(node: dict[str, Any]) -> str:
    head = " (head)" if "node:__internal_head__" in node.get("Resources", {}) else ""
    return f"node {node['NodeID'][:8]} at {node.get('NodeManagerAddress', '?')}{head}"


def _on(node_id: str) -> dict[str, Any]:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # num_cpus=0: the probe must run even when training or serving holds every CPU.
    return {"num_cpus": 0, "max_retries": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}  # fmt: skip


def _remote(fn: Any) -> Any:
    """A Ray task from a module-level function of raylm, shipped by value: probes also run on nodes
    where raylm is not importable (which is what ``raylm doctor`` wants to find out)."""
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])
    return ray.remote(fn)


def probe_storage(path: str, timeout_s: float = 120.0, filesystem: Any = None) -> ProbeResult:
    """Write one file per node, then read all files from every node (2 x nodes Ray tasks).

    ``filesystem``: probe ``path`` (an ``s3://`` URI) through this filesystem object instead of
    the one its URI resolves to on each node."""
    import ray

    uri = storage_uri(path)
    target: Any = uri
    if filesystem is not None:
        target = (filesystem, uri.removeprefix("s3://").split("?")[0].rstrip("/"))
    nodes = alive_nodes()
    token = uuid.uuid4().hex[:12]
    names = {n["NodeID"]: f"{token}-{n['NodeID'][:16]}" for n in nodes}
    expected = {name: f"raylm storage probe {name}".encode() for name in names.values()}
    write, read = _remote(_write), _remote(_read)
    try:
        # Round 1 finishes before round 2 starts: every file exists before anyone reads.
        write_errors = ray.get(
            [write.options(**_on(nid)).remote(target, n, expected[n]) for nid, n in names.items()],
            timeout=timeout_s,
        )
        read_errors = ray.get(
            [read.options(**_on(nid)).remote(target, expected) for nid in names], timeout=timeout_s
        )
    except ray.exceptions.GetTimeoutError:
        raise StorageNotShared(
            f"train.storage_path {uri!r}: the probe did not finish within {timeout_s:.0f} s; a node "
            "may hang on this path (a stale NFS mount?) or cannot run tasks"
        ) from None
    node_of = {name: nid for nid, name in names.items()}
    probes = [
        NodeProbe(n["NodeID"], _label(n), werr, {node_of[k]: v for k, v in rerr.items()})
        for n, werr, rerr in zip(nodes, write_errors, read_errors, strict=True)
    ]
    _cleanup_everywhere(target, list(names.values()), nodes)
    return ProbeResult(path=uri, nodes=probes)


def _cleanup_everywhere(uri: Any, names: list[str], nodes: list[dict[str, Any]]) -> None:
    import ray

    cleanup = _remote(_cleanup)
    # On a node-local path each node holds its own copies; delete from each node. Best effort:
    # a leftover is a few bytes under PROBE_DIR, never a reason to fail the run.
    refs = [cleanup.options(**_on(n["NodeID"])).remote(uri, names) for n in nodes]
    with contextlib.suppress(Exception):
        ray.get(refs, timeout=60)


def require_shared_storage(path: str, filesystem: Any = None) -> None:
    """On a cluster with more than one alive node, raise StorageNotShared unless the probe passes."""
    if len(alive_nodes()) < 2:
        return  # one node: every path it can write is shared with itself
    verdict = judge_probe(probe_storage(path, filesystem=filesystem))
    if verdict:
        raise StorageNotShared(f"{verdict}. {ADVICE[0].upper()}{ADVICE[1:]}.")
