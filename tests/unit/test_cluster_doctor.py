"""`raylm doctor`'s pure parts: ZeRO memory accounting, version and accelerator verdicts, the storage
probe's verdict, and the one-line formatting."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.doctor import (
    CheckResult,
    NodeFacts,
    _workers_per_node,
    check_accelerators,
    check_memory,
    check_versions,
    format_results,
    memory_estimate_for,
    parse_nvidia_smi,
)
from cluster.memory import GIB, ModelShape, estimate_memory
from cluster.storage import NodeProbe, ProbeResult, judge_probe, storage_uri

VERSIONS = {"raylm": "0.1.0", "ray": "2.60.0", "torch": "2.13.0", "deepspeed": "0.19.8",
            "transformers": "5.2.0", "python": "3.11.7"}  # fmt: skip


def _node(i: int, ram_gib: float = 64, gpus: int = 0, gpu_gib: float = 80, **versions) -> NodeFacts:
    return NodeFacts(node_id=f"n{i}", label=f"node{i}", versions={**VERSIONS, **versions},
                     ram_bytes=int(ram_gib * GIB), cpus=8, ray_gpus=gpus,
                     gpus=[("H100", int(gpu_gib * GIB))] * gpus)  # fmt: skip


# ---------------------------------------------------------------- memory


def test_zero_paper_model_state_numbers() -> None:
    # ZeRO paper, figure 1: 7.5B params, 64 GPUs, mixed precision Adam (K=12).
    shape = ModelShape(32000, 4096, 32, 32)
    psi = 7.5e9
    per_stage = [
        estimate_memory(
            psi, psi, shape, world_size=64, zero_stage=z, precision="bf16", seq_len=1, micro_batch=1
        )  # fmt: skip
        for z in range(4)
    ]
    states = [(e.params + e.grads + e.optimizer) / 1e9 for e in per_stage]
    assert states == pytest.approx([120.0, 31.4, 16.6, 1.9], abs=0.05)
    # fp32 Adam: 4 + 4 + 8 bytes per parameter without ZeRO.
    e = estimate_memory(1e9, 1e9, shape, world_size=1, zero_stage=0, precision="fp32",
                        seq_len=1, micro_batch=1)  # fmt: skip
    assert (e.params, e.grads, e.optimizer) == (4e9, 4e9, 8e9)


def test_offload_moves_states_to_host() -> None:
    shape = ModelShape(32000, 4096, 32, 32)
    e = estimate_memory(1e9, 1e9, shape, world_size=4, zero_stage=3, precision="bf16",
                        seq_len=1, micro_batch=1, offload_optimizer=True, offload_params=True)  # fmt: skip
    assert e.optimizer == 0 and e.params == 0
    assert e.offloaded == pytest.approx(12e9 / 4 + 2e9 / 4)
    assert e.grads == pytest.approx(2e9 / 4)


def test_activations_grow_with_batch_and_shrink_with_checkpointing() -> None:
    shape = ModelShape(32000, 4096, 32, 32)
    kw = dict(world_size=8, zero_stage=2, precision="bf16", seq_len=2048)

    def acts(**extra):
        return estimate_memory(7e9, 7e9, shape, **{**kw, "micro_batch": 1, **extra}).activations

    # Korthikanti et al.: s*b*h*(34 + 5*a*s/h) bytes per layer (2-byte activations) + fp32 logits.
    s, h, a, layers = 2048, 4096, 32, 32
    expected = layers * s * h * (34 + 5 * a * s / h) + 8 * s * 32000
    assert acts() == pytest.approx(expected)
    assert acts(micro_batch=4) == pytest.approx(4 * acts())
    assert acts(activation_checkpointing=True) < acts() / 10


def test_memory_check_against_ram_and_gpu() -> None:
    small = load_config(None, ["model.preset=tiny", "scaling.num_workers=2"])
    est = memory_estimate_for(small)
    ok = check_memory(est, [_node(0), _node(1)], workers_on_node=1, use_gpu=False)
    assert ok.status == "PASS" and "per worker" in ok.detail
    # A 7B model, fp32, no ZeRO: ~112 GB of model states per worker; a 64 GiB node cannot hold it.
    big = load_config(None, ["model.hidden_size=4096", "model.num_layers=32", "model.num_heads=32",
                             "model.num_kv_heads=32", "model.intermediate_size=11008",
                             "model.vocab_size=32000", "deepspeed.zero_stage=0"])  # fmt: skip
    bad = check_memory(memory_estimate_for(big), [_node(0)], workers_on_node=1, use_gpu=False)
    assert bad.status == "FAIL" and "node0 has 64.0 GiB" in bad.detail and "zero_stage" in bad.fix
    # On GPUs the device share is compared with the smallest GPU.
    gpu = check_memory(
        memory_estimate_for(big), [_node(0, gpus=8)], workers_on_node=8, use_gpu=True
    )
    assert gpu.status == "FAIL" and "per GPU" in gpu.detail
    # GPU training asked of nodes without GPUs: nothing to compare (accelerators fails instead).
    none = check_memory(est, [_node(0)], workers_on_node=1, use_gpu=True)
    assert none.status == "SKIP" and none.ok


def test_workers_per_node_follows_the_placement_strategy() -> None:
    nodes = [_node(0), _node(1), _node(2)]
    assert _workers_per_node(nodes, 6, "STRICT_SPREAD", 1.0, False) == 1
    assert _workers_per_node(nodes, 7, "SPREAD", 1.0, False) == 3
    assert _workers_per_node(nodes, 6, "PACK", 1.0, False) == 6  # 8 CPUs: all on one node
    assert _workers_per_node(nodes, 6, "PACK", 4.0, False) == 2


# ---------------------------------------------------------------- versions, accelerators


def test_versions_equal_and_different() -> None:
    ok = check_versions([_node(0), _node(1)])
    assert ok.status == "PASS" and "deepspeed 0.19.8" in ok.detail and "2 nodes" in ok.detail
    bad = check_versions([_node(0), _node(1, deepspeed="0.18.0"), _node(2, raylm="missing")])
    assert bad.status == "FAIL"
    assert "deepspeed: 0.18.0 on node1; 0.19.8 on node0, node2" in bad.detail
    assert "raylm: 0.1.0 on node0, node1; missing on node2" in bad.detail
    assert "torch" not in bad.detail and "image" in bad.fix


def test_parse_nvidia_smi() -> None:
    text = "NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, 81559\n"
    assert parse_nvidia_smi(text) == [("NVIDIA H100 80GB HBM3", 81559 * 1024**2)] * 2
    assert parse_nvidia_smi("") == []


def test_accelerators() -> None:
    cpu = check_accelerators([_node(0), _node(1)], use_gpu=False, num_workers=2)
    assert cpu.status == "PASS" and "node0: no GPU" in cpu.detail
    short = check_accelerators([_node(0), _node(1)], use_gpu=True, num_workers=2)
    assert short.status == "FAIL" and "needs 2 GPUs, the cluster offers 0" in short.detail
    gpus = check_accelerators([_node(0, gpus=4), _node(1, gpus=4)], use_gpu=True, num_workers=8)
    assert gpus.status == "PASS" and "4 GPU(s) H100" in gpus.detail
    hidden = _node(0, gpus=4)
    hidden.ray_gpus = 0  # GPUs present, node started with --num-gpus 0
    bad = check_accelerators([hidden], use_gpu=False, num_workers=1)
    assert bad.status == "FAIL" and "--num-gpus" in bad.fix


# ---------------------------------------------------------------- storage verdict


def test_storage_verdict() -> None:
    shared = ProbeResult("/mnt/nfs/ckpt", [NodeProbe("a", "head"), NodeProbe("b", "worker1")])
    assert judge_probe(shared) is None
    # Node-local disk: each node sees only its own file.
    local = ProbeResult("/tmp/ckpt", [NodeProbe("a", "head", read_errors={"b": "FileNotFoundError"}),
                                      NodeProbe("b", "worker1", read_errors={"a": "FileNotFoundError"})])  # fmt: skip
    msg = judge_probe(local)
    assert msg is not None and "'/tmp/ckpt' is not shared by the 2 nodes" in msg
    assert "head does not see the files written by worker1" in msg
    assert "worker1 does not see the files written by head" in msg
    # A read-only mount on one node: its write failure is reported, not the missing file it caused.
    ro = ProbeResult("/data", [NodeProbe("a", "head", read_errors={"b": "missing"}),
                               NodeProbe("b", "worker1", write_error="PermissionError: denied")])  # fmt: skip
    msg = judge_probe(ro)
    assert msg is not None and "worker1 cannot write there (PermissionError: denied)" in msg
    assert "does not see" not in msg


def test_storage_uri() -> None:
    assert storage_uri("s3://bucket/runs") == "s3://bucket/runs"
    assert storage_uri("runs/train").startswith("/") and storage_uri("runs/train").endswith(
        "runs/train"
    )


def test_format_results_one_line_each_with_the_fix() -> None:
    text = format_results([CheckResult("ray", "PASS", "reachable"),
                           CheckResult("storage", "FAIL", "not shared", "use s3://"),
                           CheckResult("memory", "SKIP", "no config")])  # fmt: skip
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("PASS  ray") and "fix" not in lines[0]
    assert lines[1].startswith("FAIL  storage") and lines[1].endswith("-> fix: use s3://")
    assert lines[2].startswith("SKIP  memory")
