"""The quickstart's machine-dependent choices and its shipped configs (no Ray)."""

from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.quickstart import (
    CONFIG_DIR,
    QUICKSTART_FILES,
    cpu_has_bf16,
    device_overrides,
    quickstart_configs,
)


def test_cpu_machine_keeps_the_shipped_configs() -> None:
    assert device_overrides(0) == []


def test_cpu_with_bf16_instructions_trains_in_bf16_and_the_user_can_keep_fp32(tmp_path) -> None:
    over = device_overrides(0, cpu_bf16=True)
    assert over == ["deepspeed.precision=bf16"]
    assert load_config(CONFIG_DIR / QUICKSTART_FILES["sft"], over).deepspeed.precision == "bf16"
    # What quickstart_configs picks on this machine, and a user's --set after it wins.
    want = "bf16" if cpu_has_bf16() else "fp32"
    assert quickstart_configs(str(tmp_path / "a"), []).dpo.deepspeed.precision == want
    kept = quickstart_configs(str(tmp_path / "b"), ["deepspeed.precision=fp32"])
    assert kept.pretrain.deepspeed.precision == kept.sft.deepspeed.precision == "fp32"
    assert kept.device == []  # the summary does not claim a choice the user overrode


def test_gpu_machine_uses_gpu_workers_bf16_and_a_gpu_per_replica() -> None:
    over = device_overrides(4)
    cfg = load_config(CONFIG_DIR / QUICKSTART_FILES["pretrain"], over)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 2
    assert cfg.deepspeed.precision == "bf16"
    assert load_config(CONFIG_DIR / QUICKSTART_FILES["serve"], over).serve.num_gpus == 1
    assert load_config(None, device_overrides(1)).scaling.num_workers == 1


def test_every_stage_path_moves_under_the_workdir(tmp_path) -> None:
    cfg = quickstart_configs(str(tmp_path / "qs"), [])
    root = str(tmp_path / "qs")
    assert cfg.sft.model.init_from == f"{root}/export/pretrain"
    assert cfg.serve.serve.models[0].path == f"{root}/export/sft"
    assert cfg.eval.eval.tasks and all(t.startswith(root) for t in cfg.eval.eval.tasks)
    assert cfg.pretrain.train.storage_path == cfg.sft.train.storage_path == f"{root}/train"
    assert cfg.dpo.model.init_from == f"{root}/export/sft"  # DPO starts from the SFT export
    assert cfg.dpo.train.storage_path == f"{root}/train"
    assert cfg.dpo.data.inputs == [f"{root}/corpus/preference/train"]
    assert cfg.eval.eval.preference_data == [f"{root}/corpus/preference/heldout/style.jsonl"]


def test_a_listening_port_is_in_use_but_time_wait_connections_are_not() -> None:
    """The serve stage's port check: a live listener is refused; the TIME_WAIT connections that a
    previous run's server closed (a re-run within a minute) are not, as they do not stop Serve."""
    import socket

    from cluster.quickstart import port_in_use

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn listens
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server closes first: its side of the port waits in TIME_WAIT
        client.close()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # what the check did before: refused
    assert port_in_use("127.0.0.1", port) is None
