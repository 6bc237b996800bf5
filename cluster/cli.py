"""The ``raylm`` command line: parse, build the typed config, run one stage, clean up.

Each command is a thin wrapper over a stage function; heavy imports happen inside the command so
``raylm --help`` stays fast. Config errors stop before any Ray work starts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from cluster.config import ConfigError, RaylmConfig, load_config, write_resolved
from data_pipelines.errors import DataError

__all__ = ["main", "build_parser"]

PLANNED = {
    "train": "pretraining and fine-tuning with Ray Train + DeepSpeed",
    "eval": "perplexity and task scores",
    "serve": "the OpenAI-compatible Ray Serve endpoint",
    "doctor": "cluster preflight checks",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config (omit to use defaults and --set only)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.seq_len=1024 (repeatable; beats the YAML)",
    )


def _load(args: argparse.Namespace) -> RaylmConfig:
    return load_config(args.config, args.overrides)


def tokenizer_path(cfg: RaylmConfig) -> str:
    """The tokenizer a stage uses: `data.tokenizer` if set, else what `tokenizer train` writes."""
    return cfg.data.tokenizer or cfg.tokenizer.output


def _cmd_synth(args: argparse.Namespace) -> int:
    from data_pipelines.synth import write_corpus

    try:
        summary = write_corpus(args.out, docs=args.docs, seed=args.seed, shards=args.shards)
    except ValueError as exc:
        print(f"raylm synth: {exc}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.ray_env import ray_session
    from data_pipelines.tokenizer_train import train_tokenizer

    with ray_session(cfg.ray):
        out = train_tokenizer(cfg.tokenizer, cfg.data)
    write_resolved(cfg, out)
    print(f"tokenizer written to {out}")
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.ray_env import ray_session
    from data_pipelines.prepare import PrepareResult, plan_prepare, prepare, summarize

    plan = plan_prepare(cfg.data, tokenizer_path(cfg))  # hashes inputs once, no Ray
    if plan.existing is not None:
        result = PrepareResult(Path(cfg.data.output), plan.existing, skipped=True)
    else:
        with ray_session(cfg.ray):
            result = prepare(cfg.data, tokenizer_path(cfg), plan=plan)
    write_resolved(cfg, result.output)
    print(summarize(result))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.config import write_resolved
    from cluster.ray_env import ray_session
    from training.errors import TrainConfigError
    from training.launcher import plan_job, run_dir, train

    try:
        job = plan_job(cfg)  # every config check runs here, before Ray starts any worker
    except TrainConfigError as exc:
        raise ConfigError(str(exc)) from None
    write_resolved(cfg, run_dir(cfg))
    with ray_session(cfg.ray):
        result = train(cfg, job)
    print(f"raylm train: run dir {run_dir(cfg)}; latest checkpoint {result.checkpoint}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.ray_env import ray_session
    from serving.deployment import serve_forever

    if not cfg.serve.models:
        raise ConfigError("serve.models: list at least one {name, path} to serve")
    with ray_session(cfg.ray):
        serve_forever(cfg.serve)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from training.report import report

    try:
        result = report(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"raylm report: {exc}", file=sys.stderr)
        return 1
    print(result.summary)
    print("plots: " + ", ".join(str(p) for p in result.plots))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from training.errors import CheckpointError
    from training.export import export

    try:
        out = export(args.run_or_checkpoint, args.out, dtype=args.dtype)
    except (CheckpointError, FileExistsError, ValueError) as exc:
        print(f"raylm export: {exc}", file=sys.stderr)
        return 1
    print(f"raylm export: wrote {out}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from cluster.quickstart import run_quickstart

    return run_quickstart(args.workdir, overrides=args.overrides, docs=args.docs)


def _planned(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        print(f"raylm {name}: not built yet ({PLANNED[name]}).", file=sys.stderr)
        return 2

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylm",
        description="Sharded corpora -> Ray Data -> Ray Train + DeepSpeed -> HF export -> Ray Serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "synth", help="write a deterministic synthetic corpus (pretraining + SFT tasks)"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--docs", type=int, default=4000, help="pretraining documents (default 4000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shards", type=int, default=4, help="jsonl shards per split (default 4)")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("tokenizer", help="tokenizer commands")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    tsub.required = True
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer with a chat template")
    _add_config_args(t)
    t.set_defaults(func=_cmd_tokenizer_train)

    p = sub.add_parser("data", help="data commands")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True
    d = dsub.add_parser(
        "prepare", help="corpora -> cleaned, deduplicated, tokenized, packed parquet"
    )
    _add_config_args(d)
    d.set_defaults(func=_cmd_data_prepare)

    p = sub.add_parser("train", help=PLANNED["train"] + "; resumes a run of the same name")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    for name in ("eval",):
        p = sub.add_parser(name, help=f"{PLANNED[name]} (not built yet)")
        _add_config_args(p)
        p.set_defaults(func=_planned(name))
    p = sub.add_parser("serve", help=PLANNED["serve"] + "; blocks and prints the URL")
    _add_config_args(p)
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("report", help="PNG plots and a summary of a run's metrics.jsonl")
    p.add_argument("run_dir", help="a `raylm train` run dir (storage_path/name)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("export", help="consolidated Hugging Face dir from a run or checkpoint")
    p.add_argument("run_or_checkpoint", help="run dir (newest intact checkpoint) or checkpoint dir")
    p.add_argument("--out", required=True, help="output dir (replaced if it is a raylm export)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weight dtype in model.safetensors (default fp32)")  # fmt: skip
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("doctor", help=f"{PLANNED['doctor']} (not built yet)")
    p.add_argument("--address")
    p.set_defaults(func=_planned("doctor"))

    p = sub.add_parser("quickstart", help="the main job on the embedded synthetic corpus")
    p.add_argument("--workdir", default="runs/quickstart", help="where every stage writes")
    p.add_argument("--docs", type=int, default=4000, help="synthetic pretraining documents")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"raylm: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"raylm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raylm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
