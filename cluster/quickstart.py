"""``raylm quickstart``: the main job on the embedded synthetic corpus, one line per stage.

Built so far: synth -> tokenizer -> data prepare (pretraining and SFT) -> pretraining (2 Ray Train
workers, DeepSpeed ZeRO-2). Export, fine-tuning, eval and serving join the chain as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cluster.config import RaylmConfig, load_config, write_resolved

__all__ = ["run_quickstart", "quickstart_configs"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_ROOT = "runs/quickstart"


def quickstart_configs(workdir: str, overrides: list[str]) -> tuple[RaylmConfig, RaylmConfig]:
    """The shipped quickstart YAMLs with every path moved under ``workdir``."""

    def load(name: str) -> RaylmConfig:
        text = (CONFIG_DIR / name).read_text().replace(DEFAULT_ROOT, workdir.rstrip("/"))
        tmp = Path(workdir) / "configs" / name
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        return load_config(tmp, overrides)

    return load("quickstart.yaml"), load("quickstart_sft.yaml")


def _quiet_ray_data() -> None:
    """The quickstart prints one line per stage; Ray Data's own bars and INFO lines would bury them."""
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _stage(n: int, total: int, name: str, detail: str, seconds: float) -> None:
    print(f"[{n}/{total}] {name:<18} {detail}  ({seconds:.1f}s)", flush=True)


def _synth(corpus: Path, docs: int, seed: int) -> str:
    from data_pipelines.synth import write_corpus

    marker = corpus / "synth.json"
    if marker.is_file():
        args = json.loads(marker.read_text()).get("args", {})
        if args.get("docs") == docs and args.get("seed") == seed:
            return f"{corpus} (reused)"
    write_corpus(str(corpus), docs=docs, seed=seed)
    return str(corpus)


def _tokenizer(cfg: RaylmConfig) -> str:
    from data_pipelines.tokenizer_train import train_tokenizer

    out = Path(cfg.tokenizer.output)
    resolved = out / "raylm_config.yaml"
    if (out / "tokenizer.json").is_file() and resolved.is_file():
        import yaml

        if yaml.safe_load(resolved.read_text()).get("tokenizer") == cfg.tokenizer.model_dump(
            mode="json"
        ):
            return f"{out} (reused)"
    train_tokenizer(cfg.tokenizer, cfg.data, progress=False)
    write_resolved(cfg, out)
    return str(out)


def _prepare(cfg: RaylmConfig) -> tuple[str, dict]:
    from data_pipelines.prepare import prepare

    result = prepare(cfg.data, cfg.data.tokenizer, progress=False)
    write_resolved(cfg, result.output)
    m = result.manifest
    detail = (
        f"{m['documents_kept']}/{m['documents_read']} docs, {m['tokens']} tokens, "
        f"{m['splits']['train']['rows']}+{m['splits']['validation']['rows']} rows"
    )
    return detail + (" (reused)" if result.skipped else ""), m


def _pretrain(cfg: RaylmConfig) -> str:
    """2 Ray Train workers under ZeRO-2; a finished run resumes from its last checkpoint at once."""
    from training.launcher import plan_job, run_dir, train

    job = plan_job(cfg)
    write_resolved(cfg, run_dir(cfg))
    train(cfg, job)
    rows = [json.loads(x) for x in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines() if x]
    evals = [r for r in rows if "eval_loss" in r]
    last = rows[-1] if rows else {}
    detail = f"step {last.get('step')}, loss {last.get('loss', float('nan')):.3f}"
    if evals:
        detail += f", eval loss {evals[-1]['eval_loss']:.3f} (ppl {evals[-1]['perplexity']:.1f})"
    return detail


def run_quickstart(
    workdir: str = DEFAULT_ROOT, overrides: list[str] | None = None, docs: int = 4000
) -> int:
    from cluster.ray_env import ray_session

    pre_cfg, sft_cfg = quickstart_configs(workdir, overrides or [])
    corpus = Path(workdir) / "corpus"
    total, started = 5, time.perf_counter()
    t = time.perf_counter()
    _stage(1, total, "synth", _synth(corpus, docs, pre_cfg.seed), time.perf_counter() - t)
    with ray_session(pre_cfg.ray):
        _quiet_ray_data()
        t = time.perf_counter()
        _stage(2, total, "tokenizer train", _tokenizer(pre_cfg), time.perf_counter() - t)
        t = time.perf_counter()
        detail, pre_manifest = _prepare(pre_cfg)
        _stage(3, total, "data prepare", detail, time.perf_counter() - t)
        t = time.perf_counter()
        detail, sft_manifest = _prepare(sft_cfg)
        _stage(4, total, "data prepare sft", detail, time.perf_counter() - t)
        t = time.perf_counter()
        _stage(5, total, "pretrain", _pretrain(pre_cfg), time.perf_counter() - t)
    print(f"\nquickstart finished in {time.perf_counter() - started:.0f}s. Artifacts:")
    print(f"  corpus      {corpus}")
    print(f"  tokenizer   {pre_cfg.tokenizer.output}")
    print(f"  data        {pre_cfg.data.output}/manifest.json")
    print(f"  sft         {sft_cfg.data.output}/manifest.json")
    print(f"  run         {pre_cfg.train.storage_path}/{pre_cfg.name}/metrics.jsonl")
    print("Run a stage alone: raylm tokenizer train | data prepare | train configs/quickstart.yaml")
    print("Next stages (export, fine-tune, eval, serve) are not in the quickstart yet.")
    return 0
