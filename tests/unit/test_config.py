from pathlib import Path

import pytest

from cluster.cli import build_parser, main
from cluster.config import ConfigError, load_config, write_resolved

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert CONFIGS, "configs/ ships no YAML"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_says_how_to_run_it(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name}: first line must be a comment with its command"
    assert "raylm" in path.read_text().split("\n\n")[0] or "serve" in first
    load_config(path)


def test_precedence_set_beats_yaml_beats_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  seq_len: 128\n  inputs: [a]\n")
    assert load_config(cfg_file).data.seq_len == 128
    assert load_config(cfg_file).data.batch_size == 512  # default
    cfg = load_config(cfg_file, ["data.seq_len=64", "data.pii.enabled=true", "data.inputs=[x, y]"])
    assert (cfg.data.seq_len, cfg.data.pii.enabled, cfg.data.inputs) == (64, True, ["x", "y"])


def test_unknown_key_and_wrong_type_name_file_and_path(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("data:\n  seq_len: lots\n  dedup:\n    partitons: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file)
    msg = str(err.value)
    assert f"{cfg_file}: data.seq_len: Input should be a valid integer" in msg
    assert f"{cfg_file}: data.dedup.partitons: unknown key" in msg
    with pytest.raises(ConfigError, match=r"--set: data.validation_fraction: .*less than 1"):
        load_config(None, ["data.validation_fraction=1.5"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(None, ["data.seq_len"])


def test_invalid_yaml_names_the_line(tmp_path):
    cfg_file = tmp_path / "broken.yaml"
    cfg_file.write_text("data:\n  seq_len: 12\n  inputs: [a\n")
    with pytest.raises(ConfigError, match=rf"{cfg_file}:\d+: invalid YAML"):
        load_config(cfg_file)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.seq_len=99", "name=r1"])
    path = write_resolved(cfg, tmp_path)
    again = load_config(path)
    assert again == cfg


def test_cli_lists_every_command():
    helptext = build_parser().format_help()
    for cmd in (
        "synth",
        "tokenizer",
        "data",
        "train",
        "report",
        "export",
        "eval",
        "serve",
        "quickstart",
        "doctor",
    ):
        assert cmd in helptext


def test_cli_reports_config_errors_before_any_work(tmp_path, capsys):
    assert main(["data", "prepare", "--set", "data.nope=1"]) == 2
    assert "data.nope: unknown key" in capsys.readouterr().err
