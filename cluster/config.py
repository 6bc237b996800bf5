"""The one typed config tree, loaded from YAML and overridden by dotted keys.

Precedence: ``--set key=value`` > YAML file > schema defaults. Every section is owned by its stage
(``data_pipelines.config``, ...); this module only composes them and turns validation failures into
one-line errors that name the file and the dotted path.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_pipelines.config import DataConfig, TokenizerConfig
from serving.config import GenerateConfig, ServeConfig
from training.config import (
    DeepSpeedConfig,
    EvalConfig,
    ModelConfig,
    ScalingConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "RayConfig",
    "RaylmConfig",
    "apply_overrides",
    "config_fingerprint",
    "load_config",
    "write_resolved",
]

RESOLVED_NAME = "raylm_config.yaml"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the dotted key."""


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None,
        description="Ray address to join; unset: join a running cluster if any, else start local Ray.",
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs for a local Ray instance (default: max(4, 2 x cores)).",
    )


class RaylmConfig(BaseModel):
    """Root of the config tree. Unknown keys anywhere are errors."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("raylm", description="Run name; also the folder name under storage paths.")
    seed: int = Field(0, description="Seed for every random choice the stages make.")
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)


def _parse_value(raw: str) -> Any:
    """Parse an override value the way YAML would (`3` -> int, `true` -> bool, `[a, b]` -> list)."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(
    tree: dict[str, Any], overrides: list[str], source: str = "--set"
) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested dict, in order. Returns the same dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source} {item!r}: expected dotted.key=value")
        parts = key.strip().split(".")
        node = tree
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source} {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return tree


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"]
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RaylmConfig:
    """Load and validate a config. Raises ConfigError naming the file and key on any problem."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}{where}: invalid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    if overrides:
        apply_overrides(tree, overrides)
        source = f"{source} (with --set overrides)" if path else "--set"
    try:
        return RaylmConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def write_resolved(cfg: BaseModel, out_dir: str | Path, name: str = RESOLVED_NAME) -> Path:
    """Write the fully resolved config next to a stage's outputs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    target.write_text(
        yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8"
    )
    return target


def config_fingerprint(section: BaseModel, exclude: set[str] | None = None) -> str:
    """sha256 of a section's values, leaving out keys that cannot change its outputs."""
    data = section.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
