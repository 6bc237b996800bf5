"""The ``raylm`` command line: parse, build the typed config, run one stage, clean up.

Each command is a thin wrapper over a stage function; heavy imports happen inside the command so
``raylm --help`` stays fast. Config errors stop before any Ray work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.config import ConfigError, RaylmConfig, load_config, write_resolved
from data_pipelines.errors import DataError

__all__ = ["main", "build_parser"]

HELP = {
    "train": "pretraining and fine-tuning with Ray Train + DeepSpeed",
    "serve": "the OpenAI-compatible Ray Serve endpoint",
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
    _add_verbose(p)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's, DeepSpeed's and the workers' own output on the console too "
                   "(also RAYLM_LOG_LEVEL=debug); by default it goes to raylm.log in the "
                   "output dir")  # fmt: skip


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

    with ray_session(cfg.ray, cfg.tokenizer.output, args.verbose):
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
        with ray_session(cfg.ray, cfg.data.output, args.verbose):
            result = prepare(cfg.data, tokenizer_path(cfg), plan=plan)
    write_resolved(cfg, result.output)
    print(summarize(result))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.config import write_resolved
    from cluster.ray_env import ray_session
    from training.errors import Preempted, RunLockedError, TrainConfigError
    from training.launcher import FinishedRun, finish_if_done, open_run, plan_job, train
    from training.preempt import EXIT_PREEMPTED

    try:
        job = plan_job(cfg)  # every config check runs here, before Ray starts any worker
    except TrainConfigError as exc:
        raise ConfigError(str(exc)) from None
    try:
        # Locked before the resolved config is written: a live run's copy is never replaced.
        # S3: the lock is a lease object and run.local a mirror uploaded as the run goes.
        with open_run(cfg) as run:
            write_resolved(cfg, run.local)
            result = finish_if_done(cfg, job)  # a finished run needs neither workers nor Ray
            if result is None:
                with ray_session(cfg.ray, run.local, args.verbose):
                    _require_shared_storage(cfg, run.fs)
                    result = train(cfg, job)
    except RunLockedError as exc:
        print(f"raylm train: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"raylm train: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    if isinstance(result, FinishedRun):
        print(
            f"raylm train: run {cfg.name!r} already finished at step {result.step}: nothing to train"
        )
    print(f"raylm train: run dir {run.uri}; latest checkpoint {result.checkpoint}")
    if cfg.train.export_dir:
        print(f"raylm train: exported to {Path(cfg.train.export_dir).resolve()}")
    return 0


def _require_shared_storage(cfg: RaylmConfig, filesystem: object = None) -> None:
    """Multi-node only: a probe (a file written on each node, read on every other) decides;
    ``filesystem``: the run's S3 filesystem (endpoint, credentials), probed as the run uses it."""
    from cluster.storage import StorageNotShared, require_shared_storage

    try:
        require_shared_storage(cfg.train.storage_path, filesystem)
    except StorageNotShared as exc:
        raise ConfigError(str(exc)) from None


def _cmd_doctor(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.doctor import main_doctor
    from cluster.ray_env import cluster_address

    address = args.address or cluster_address(cfg.ray)
    return main_doctor(cfg, address, with_config=bool(args.config or args.overrides))


def _cmd_serve(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.ray_env import ray_session
    from serving.deployment import serve_forever

    if not cfg.serve.models:
        raise ConfigError("serve.models: list at least one {name, path} to serve")
    with ray_session(cfg.ray, Path("runs") / "serve" / cfg.serve.app_name, args.verbose):
        serve_forever(cfg.serve)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from cluster.ray_env import ray_session
    from serving.batch_job import GenerateResult, generate, plan_generate, summarize

    plan = plan_generate(cfg.generate)  # hashes inputs and model once, no Ray
    if plan.existing is not None:
        result = GenerateResult(Path(cfg.generate.output), plan.existing, skipped=True)
    else:
        with ray_session(cfg.ray, cfg.generate.output, args.verbose):
            result = generate(cfg.generate, plan=plan)
    write_resolved(cfg, result.output)
    print(summarize(result))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from training.report import report

    try:
        result = report(args.run_dir)
    except (OSError, ValueError) as exc:  # OSError: also S3 (endpoint, credentials)
        print(f"raylm report: {exc}", file=sys.stderr)
        return 1
    print(result.summary)
    print("plots: " + ", ".join(str(p) for p in result.plots))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from training.errors import CheckpointError
    from training.export import export

    try:
        cfg = load_config(None, args.overrides)
        out = export(args.run_or_checkpoint, args.out, dtype=args.dtype,
                     adapter_only=args.adapter_only,
                     max_shard_size=cfg.train.export_max_shard_size)  # fmt: skip
    except (CheckpointError, OSError, ValueError) as exc:  # OSError: also S3 access; ConfigError
        print(f"raylm export: {exc}", file=sys.stderr)
        return 1
    print(f"raylm export: wrote {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare_evals(args)
    cfg = _load(args)
    from cluster.evaluate import run_eval
    from training.evaluate import EvalError, eval_output, format_table

    out = eval_output(cfg.eval, cfg.name)
    try:
        if cfg.eval.distributed:  # actors on the cluster; Ray's own output to out/raylm.log
            from cluster.ray_env import ray_session

            with ray_session(cfg.ray, out, args.verbose):
                report = run_eval(cfg.eval, cfg.name, progress=sys.stderr.isatty())
        else:
            report = run_eval(cfg.eval, cfg.name, progress=sys.stderr.isatty())
    except EvalError as exc:  # every input check runs before a model loads
        raise ConfigError(str(exc)) from None
    write_resolved(cfg, out)
    print(format_table(report))
    print(f"raylm eval: wrote {out / 'eval.json'}")
    return 0


def _compare_evals(args: argparse.Namespace) -> int:
    from training.evaluate import compare_table, load_report

    if args.config or args.overrides:
        print("raylm eval: --compare reads two eval.json files; drop CONFIG/--set", file=sys.stderr)
        return 2
    try:
        a, b = (load_report(path) for path in args.compare)
    except (FileNotFoundError, ValueError) as exc:
        print(f"raylm eval: {exc}", file=sys.stderr)
        return 2
    print(compare_table(a, b))
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from cluster.quickstart import run_quickstart

    return run_quickstart(args.workdir, overrides=args.overrides, docs=args.docs,
                          verbose=args.verbose)  # fmt: skip


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

    p = sub.add_parser("train", help=HELP["train"] + "; resumes a run of the same name")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval", help="held-out perplexity and task scores of a model dir; --compare two runs"
    )
    _add_config_args(p)
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="print two eval.json files (or dirs holding one) side by side; runs no model")  # fmt: skip
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser(
        "generate", help="batch inference over Ray Data: prompts (jsonl/parquet) -> parquet"
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("serve", help=HELP["serve"] + "; blocks and prints the URL")
    _add_config_args(p)
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("report", help="PNG plots and a summary of a run's metrics.jsonl")
    p.add_argument("run_dir", help="a `raylm train` run dir (storage_path/name; s3:// too)")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("export", help="consolidated Hugging Face dir from a run or checkpoint")
    p.add_argument("run_or_checkpoint",
                   help="run dir (newest intact checkpoint) or checkpoint dir; local or s3://")  # fmt: skip
    p.add_argument("--out", required=True, help="output dir (replaced if it is a raylm export)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weight dtype in model.safetensors (default fp32)")  # fmt: skip
    p.add_argument("--adapter-only", action="store_true",
                   help="LoRA runs: write the adapter alone (peft format), not the merged model")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config keys export reads, e.g. train.export_max_shard_size=2GB")  # fmt: skip
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("doctor", help="cluster preflight checks, one line each with the fix")
    _add_config_args(p)
    p.add_argument("--address", help="GCS address HOST:6379 (default: ray.address, RAY_ADDRESS, "
                   "a `ray start` cluster on this machine, else local Ray)")  # fmt: skip
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("quickstart", help="the main job on the embedded synthetic corpus")
    p.add_argument("--workdir", default="runs/quickstart", help="where every stage writes")
    p.add_argument("--docs", type=int, default=4000, help="synthetic pretraining documents")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_verbose(p)
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
