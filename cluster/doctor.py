"""``raylm doctor``: preflight checks against a cluster, one line each with the fix.

Checks, in order (a failed connection stops the rest):

1. Ray reachable and authenticated: a GCS handshake (``GetClusterId``) with this process's token,
   so a refused connection and a rejected token give different answers within a second.
2. raylm / ray / torch / deepspeed / transformers / Python versions equal on every node (a task
   pinned to each node reports them).
3. Accelerators per node (Ray's GPU resource and ``nvidia-smi``), against ``scaling``.
4. ``train.storage_path`` writable and readable across nodes (``cluster.storage`` probe).
5. A memory estimate for the config (``cluster.memory``) against each node's RAM and GPU memory.

The pure parts (version comparison, accelerator and memory verdicts, formatting) take plain data and
are unit-tested; the Ray parts only gather that data.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.memory import GIB, MemoryEstimate, ModelShape, estimate_memory

if TYPE_CHECKING:
    from cluster.config import RaylmConfig

__all__ = [
    "CheckResult",
    "NodeFacts",
    "check_accelerators",
    "check_memory",
    "check_reachable",
    "check_storage",
    "check_versions",
    "format_results",
    "gather_node_facts",
    "memory_estimate_for",
    "parse_nvidia_smi",
    "run_doctor",
]

PACKAGES = ("raylm", "ray", "torch", "deepspeed", "transformers")
# Share of a node's memory the estimate may take; the rest is allocator slack, buffers, the OS.
MEMORY_HEADROOM = 0.9
# Host memory of one training worker process beyond its tensors: an allowance (importing torch,
# deepspeed, transformers and ray.train alone measured 0.5 GiB RSS here; the engine, collectives
# and data iterators come on top).
HOST_OVERHEAD_BYTES = 1.5 * GIB


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: str  # "PASS" | "FAIL" | "SKIP"
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


@dataclass
class NodeFacts:
    """What one node reports about itself (a task pinned to it)."""

    node_id: str
    label: str
    versions: dict[str, str]
    ram_bytes: int
    cpus: float = 0.0
    ray_gpus: float = 0.0  # Ray's GPU resource on this node
    gpus: list[tuple[str, int]] = field(default_factory=list)  # nvidia-smi: (name, bytes)


def _pass(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "PASS", detail)


def _fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "FAIL", detail, fix)


def format_results(results: Iterable[CheckResult]) -> str:
    """One line per check: status, name, what was found, and for failures the fix."""
    lines = []
    for r in results:
        fix = f" -> fix: {r.fix}" if r.fix and r.status == "FAIL" else ""
        lines.append(f"{r.status:4}  {r.name:<12} {r.detail}{fix}")
    return "\n".join(lines)


# ---------------------------------------------------------------- pure verdicts


def parse_nvidia_smi(text: str) -> list[tuple[str, int]]:
    """``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`` -> [(name, bytes)]
    (memory.total is in MiB)."""
    gpus = []
    for line in text.strip().splitlines():
        name, mib = line.rsplit(",", 1)
        gpus.append((name.strip(), int(float(mib)) * 1024 * 1024))
    return gpus


def check_versions(facts: list[NodeFacts]) -> CheckResult:
    """Every package at one version on every node."""
    problems = []
    for pkg in (*PACKAGES, "python"):
        seen: dict[str, list[str]] = {}
        for f in facts:
            seen.setdefault(f.versions.get(pkg, "missing"), []).append(f.label)
        if len(seen) > 1 or "missing" in seen:
            where = "; ".join(f"{v} on {', '.join(labels)}" for v, labels in sorted(seen.items()))
            problems.append(f"{pkg}: {where}")
    if problems:
        return _fail("versions", " | ".join(problems),
                     "install the same raylm/ray/torch/deepspeed/transformers/Python on every "
                     "node: one image for head and workers (cluster/Dockerfile)")  # fmt: skip
    v = facts[0].versions if facts else {}
    summary = ", ".join(f"{p} {v.get(p)}" for p in (*PACKAGES, "python"))
    return _pass("versions", f"{summary} on all {len(facts)} nodes")


def check_accelerators(facts: list[NodeFacts], use_gpu: bool, num_workers: int) -> CheckResult:
    """GPUs per node as Ray and nvidia-smi see them, against what the config asks for."""
    per_node = []
    for f in facts:
        kinds = sorted({name for name, _ in f.gpus})
        seen = f"{len(f.gpus)} GPU(s) {', '.join(kinds)}".strip() if f.gpus else "no GPU"
        per_node.append(f"{f.label}: {seen} (Ray GPU resource {f.ray_gpus:g})")
    detail = "; ".join(per_node)
    hidden = [f.label for f in facts if f.gpus and f.ray_gpus < len(f.gpus)]
    if hidden:
        return _fail("accelerators", detail,
                     f"Ray does not offer every GPU on {', '.join(hidden)}: start those nodes "
                     "without --num-gpus, or with --num-gpus equal to the GPU count")  # fmt: skip
    total = sum(f.ray_gpus for f in facts)
    if use_gpu and total < num_workers:
        return _fail("accelerators", f"{detail}; scaling.num_workers={num_workers} needs "
                     f"{num_workers} GPUs, the cluster offers {total:g}",
                     "add GPU worker nodes, lower scaling.num_workers, or set "
                     "scaling.use_gpu: false")  # fmt: skip
    mode = f"GPU training on {num_workers} GPU(s)" if use_gpu else "CPU training (use_gpu: false)"
    return _pass("accelerators", f"{detail}; {mode}")


def _workers_per_node(facts: list[NodeFacts], num_workers: int, strategy: str,
                      cpus_per_worker: float, use_gpu: bool) -> int:  # fmt: skip
    """Most workers one node may hold under the placement strategy (worst case)."""
    if strategy == "STRICT_SPREAD":
        return 1
    if strategy == "SPREAD":
        return math.ceil(num_workers / max(1, len(facts)))
    slots = max(
        int(f.ray_gpus) if use_gpu else int(f.cpus // cpus_per_worker) for f in facts
    )  # PACK / STRICT_PACK fill one node first
    return max(1, min(num_workers, slots))


def check_memory(
    est: MemoryEstimate, facts: list[NodeFacts], *, workers_on_node: int, use_gpu: bool
) -> CheckResult:
    """The estimate against GPU memory (GPU training) and each node's RAM (host side)."""
    host_per_worker = HOST_OVERHEAD_BYTES + est.offloaded + (0 if use_gpu else est.device_bytes)
    host_need = workers_on_node * host_per_worker
    detail = f"{est.describe()}; up to {workers_on_node} worker(s) on a node"
    short = [f for f in facts if host_need > MEMORY_HEADROOM * f.ram_bytes]
    if short:
        f = min(short, key=lambda x: x.ram_bytes)
        return _fail("memory", f"{detail} need {host_need / GIB:.1f} GiB of RAM, {f.label} has "
                     f"{f.ram_bytes / GIB:.1f} GiB", _memory_fix(use_gpu))  # fmt: skip
    if use_gpu:
        gpu_mem = [b for f in facts for _, b in f.gpus]
        if not gpu_mem:
            return CheckResult(
                "memory", "SKIP", f"{detail}; no GPU found to hold the per-GPU share"
            )
        if est.device_bytes > MEMORY_HEADROOM * min(gpu_mem):
            return _fail("memory", f"{detail}: {est.device_bytes / GIB:.1f} GiB per GPU, the "
                         f"smallest GPU has {min(gpu_mem) / GIB:.1f} GiB", _memory_fix(use_gpu))  # fmt: skip
    ram = min(f.ram_bytes for f in facts) / GIB if facts else 0.0
    return _pass("memory", f"{detail}: {host_need / GIB:.1f} GiB of the smallest node's "
                 f"{ram:.1f} GiB RAM")  # fmt: skip


def _memory_fix(use_gpu: bool) -> str:
    fix = "raise deepspeed.zero_stage (3 shards weights too), add workers, lower "
    fix += "train.micro_batch_size or turn on train.activation_checkpointing"
    return fix + (", or deepspeed.offload_optimizer" if use_gpu else ", or use a smaller model")


def memory_estimate_for(cfg: RaylmConfig) -> MemoryEstimate:
    """The estimate for a config (vocabulary: model.vocab_size, else tokenizer.vocab_size), with
    parameters counted on a meta-device instance of the real architecture."""
    from training.lora import lora_param_counts
    from training.model import hf_config, meta_model, model_stats

    conf = hf_config(cfg.model, cfg.model.vocab_size or cfg.tokenizer.vocab_size)
    stats = model_stats(conf)
    total = trainable = stats.total_params
    if cfg.train.lora.enabled:
        total, trainable = lora_param_counts(meta_model(conf), cfg.train.lora)
    shape = ModelShape(stats.vocab_size, stats.hidden_size, stats.num_layers, stats.num_heads)
    return estimate_memory(
        total, trainable, shape, world_size=cfg.scaling.num_workers,
        zero_stage=cfg.deepspeed.zero_stage, precision=cfg.deepspeed.precision,
        seq_len=_seq_len(cfg), micro_batch=cfg.train.micro_batch_size,
        activation_checkpointing=cfg.train.activation_checkpointing,
        offload_optimizer=cfg.deepspeed.offload_optimizer,
        offload_params=cfg.deepspeed.offload_params,
    )  # fmt: skip


def _seq_len(cfg: RaylmConfig) -> int:
    """The first dataset's seq_len when its manifest is readable here, else data.seq_len."""
    if cfg.train.datasets:
        from training.data import dataset_info
        from training.errors import TrainConfigError

        try:
            return dataset_info(cfg.train.datasets[0].path).seq_len
        except (TrainConfigError, OSError, ValueError):
            pass
    return cfg.data.seq_len


# ---------------------------------------------------------------- Ray edge


def _gcs_handshake(address: str, timeout_s: float = 10.0) -> CheckResult:
    """One ``GetClusterId`` call with the token this process would use (if token auth is on)."""
    import grpc
    from ray._private.authentication.http_token_authentication import (
        get_auth_headers_if_auth_enabled,
    )
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    headers = get_auth_headers_if_auth_enabled({})  # {"authorization": "Bearer ..."} or {}
    metadata = [(k.lower(), v) for k, v in headers.items()]
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s,
                              metadata=metadata)  # fmt: skip
        except grpc.RpcError as exc:
            return _handshake_failure(address, exc.code(), bool(metadata))
    auth = "token accepted" if metadata else "no token sent (cluster without token auth)"
    return _pass("ray", f"GCS at {address} reachable, {auth}")


def _handshake_failure(address: str, code: Any, sent_token: bool) -> CheckResult:
    import grpc

    if code == grpc.StatusCode.UNAUTHENTICATED:
        if sent_token:
            return _fail("ray", f"GCS at {address} rejected this process's token",
                         "use the cluster's token: `ray get-auth-token` on the head, then "
                         "RAY_AUTH_TOKEN_PATH=<file> or ~/.ray/auth_token here")  # fmt: skip
        return _fail("ray", f"GCS at {address} requires a token and none was sent",
                     "export RAY_AUTH_MODE=token and provide the cluster's token (RAY_AUTH_TOKEN_PATH "
                     "or ~/.ray/auth_token; `ray get-auth-token` on the head prints it)")  # fmt: skip
    return _fail("ray", f"no Ray GCS answering at {address} ({code.name})",
                 "start the cluster (`ray start --head`) or pass the head's GCS address "
                 "HOST:6379 (not the dashboard URL) with --address")  # fmt: skip


def check_reachable(address: str | None) -> CheckResult:
    """Handshake with the cluster at ``address`` (None: local Ray is started instead)."""
    if address is None:
        return _pass("ray", "no cluster address (--address, ray.address, RAY_ADDRESS): local Ray")
    if address.startswith("ray://"):
        return _pass("ray", f"{address}: Ray Client address, checked by connecting")
    from ray._private.services import canonicalize_bootstrap_address

    try:
        gcs = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        return _fail("ray", f"cannot resolve {address!r}: {exc}",
                     "pass the head's GCS address HOST:6379 with --address")  # fmt: skip
    return _gcs_handshake(gcs or address)


def _node_facts() -> dict[str, Any]:
    """Runs on one node: package versions, RAM (cgroup-aware, as Ray sees it), nvidia-smi GPUs."""
    import importlib.metadata as md
    import platform
    import subprocess

    from ray._private.utils import get_system_memory

    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "missing"
    gpus: list[tuple[str, int]] = []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout  # fmt: skip
        gpus = parse_nvidia_smi(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass  # no driver / no GPU on this node
    return {"versions": versions, "ram_bytes": int(get_system_memory()), "gpus": gpus}


def gather_node_facts(timeout_s: float = 180.0) -> list[NodeFacts]:
    """One task pinned to each alive node (needs a connected Ray)."""
    import ray

    from cluster.storage import _label, _on, _remote, alive_nodes

    nodes = alive_nodes()
    task = _remote(_node_facts)
    raw = ray.get([task.options(**_on(n["NodeID"])).remote() for n in nodes], timeout=timeout_s)
    return [
        NodeFacts(
            node_id=n["NodeID"],
            label=_label(n),
            cpus=n["Resources"].get("CPU", 0.0),
            ray_gpus=n["Resources"].get("GPU", 0.0),
            versions=r["versions"],
            ram_bytes=r["ram_bytes"],
            gpus=[tuple(g) for g in r["gpus"]],
        )  # fmt: skip
        for n, r in zip(nodes, raw, strict=True)
    ]


def check_storage(path: str, filesystem: Any = None) -> CheckResult:
    from cluster.storage import ADVICE, judge_probe, probe_storage

    try:
        result = probe_storage(path, filesystem=filesystem)
    except Exception as exc:  # a probe that cannot run is a failed check, with its reason
        return _fail("storage", f"probe of {path!r} could not run: {type(exc).__name__}: {exc}",
                     "check that every node is alive and can reach the path")  # fmt: skip
    verdict = judge_probe(result)
    if verdict:
        return _fail("storage", verdict, ADVICE)
    return _pass("storage", f"{result.path}: each of {len(result.nodes)} node(s) wrote a file "
                 "and read every node's file")  # fmt: skip


def _storage_check(cfg: RaylmConfig) -> CheckResult:
    """The probe; an s3:// path through the filesystem training builds (train.s3, env)."""
    from training.storage import is_s3, parse_s3, s3_filesystem

    path, s3, fs = cfg.train.storage_path, cfg.train.s3, None
    if is_s3(path):
        try:
            fs = s3_filesystem(parse_s3(path, s3.endpoint_url, s3.region))
        except ValueError as exc:  # TrainConfigError: an unknown URI option
            return _fail("storage", str(exc), "fix train.storage_path")
    return check_storage(path, fs)


def _memory_check(cfg: RaylmConfig, facts: list[NodeFacts]) -> CheckResult:
    try:
        est = memory_estimate_for(cfg)
    except (OSError, ValueError) as exc:
        return _fail("memory", f"cannot estimate: {exc}", "fix the model section of the config")
    sc = cfg.scaling
    per_node = _workers_per_node(facts, sc.num_workers, sc.placement_strategy,
                                 sc.cpus_per_worker, sc.use_gpu)  # fmt: skip
    return check_memory(est, facts, workers_on_node=per_node, use_gpu=sc.use_gpu)


def run_doctor(cfg: RaylmConfig, address: str | None, with_config: bool) -> list[CheckResult]:
    """Every check; a failed connection stops the rest. Leaves Ray as it found it."""
    import ray

    results = [check_reachable(address)]
    if not results[0].ok:
        return results
    started = not ray.is_initialized()
    if started:
        from cluster.ray_env import local_num_cpus

        if address:
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:
            ray.init(num_cpus=local_num_cpus(cfg.ray.num_cpus), include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")  # fmt: skip
    try:
        facts = gather_node_facts()
        results.append(check_versions(facts))
        results.append(check_accelerators(facts, cfg.scaling.use_gpu, cfg.scaling.num_workers))
        if not with_config:
            skip = "give a CONFIG (or --set) to check train.storage_path and the memory estimate"
            results += [CheckResult("storage", "SKIP", skip), CheckResult("memory", "SKIP", skip)]
        else:
            results.append(_storage_check(cfg))
            results.append(_memory_check(cfg, facts))
    finally:
        if started:
            ray.shutdown()
    return results


def main_doctor(cfg: RaylmConfig, address: str | None, with_config: bool) -> int:
    """Print one line per check; exit status 1 when any check failed."""
    results = run_doctor(cfg, address, with_config)
    print(format_results(results))
    failed = [r.name for r in results if not r.ok]
    if failed:
        print(f"raylm doctor: {len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("raylm doctor: all checks passed")
    return 0
