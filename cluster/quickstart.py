"""``raylm quickstart``: the main job on the embedded synthetic corpus, one line per stage.

synth -> tokenizer -> data prepare (pretraining and SFT) -> pretraining (2 Ray Train workers,
DeepSpeed ZeRO-2) -> export -> SFT fine-tuning -> export -> data prepare (preference pairs) -> DPO
from the SFT export (reference log-probs by a Ray Data job first) -> export -> eval (the pretrained
model as control for SFT, the SFT model for DPO) -> Ray Serve endpoint answering one chat request
over HTTP -> summary. Every stage is also a YAML
in ``configs/`` run by its own command; a second run reuses finished stages (content hashes, a
finished training run, an export of the newest checkpoint) instead of redoing them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.config import RaylmConfig, load_config, write_resolved
from cluster.ray_env import ray_session

__all__ = [
    "QUICKSTART_FILES",
    "SUMMARY_NAME",
    "cpu_has_bf16",
    "device_overrides",
    "port_in_use",
    "quickstart_configs",
    "run_quickstart",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_ROOT = "runs/quickstart"
# Stage name -> the shipped YAML that runs it alone.
QUICKSTART_FILES = {
    "pretrain": "quickstart.yaml",
    "sft": "quickstart_sft.yaml",
    "dpo": "quickstart_dpo.yaml",
    "eval": "eval_quickstart.yaml",
    "serve": "serve.yaml",
}
STAGES = 13
SUMMARY_NAME = "summary.json"  # what the closing summary printed, for scripts and tests


@dataclass
class Configs:
    pretrain: RaylmConfig
    sft: RaylmConfig
    dpo: RaylmConfig
    eval: RaylmConfig
    serve: RaylmConfig
    device: list[str] = field(default_factory=list)  # device_overrides() applied on this machine


@dataclass
class Outcome:
    """What the summary prints: artifact paths and headline numbers, filled stage by stage."""

    workdir: Path
    artifacts: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, str] = field(default_factory=dict)
    compare: str = ""
    compare_dpo: str = ""
    answer: dict[str, Any] = field(default_factory=dict)


def device_overrides(cuda_devices: int, cpu_bf16: bool = False) -> list[str]:
    """Config overrides for this machine: with CUDA, GPU workers in bf16 and a GPU per replica;
    on a CPU with bf16 instructions, bf16 training (1.3x the fp32 steps per second on this host)."""
    if cuda_devices <= 0:
        return ["deepspeed.precision=bf16"] if cpu_bf16 else []
    return [
        "scaling.use_gpu=true",
        f"scaling.num_workers={min(2, cuda_devices)}",
        "deepspeed.precision=bf16",
        "serve.num_gpus=1",
    ]


def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 matmul instructions (AVX512-BF16 or AMX), which PyTorch's bf16
    GEMMs use; without them bf16 brings no faster GEMM than fp32, so the quickstart keeps fp32."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch >= 2.1
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _key(override: str) -> str:
    return override.partition("=")[0].strip()  # as cluster.config.apply_overrides reads it


def quickstart_configs(workdir: str, overrides: list[str]) -> Configs:
    """The shipped quickstart YAMLs with every path moved under ``workdir``."""
    root = workdir.rstrip("/")

    def load(name: str, extra: list[str]) -> RaylmConfig:
        text = (CONFIG_DIR / name).read_text().replace(DEFAULT_ROOT, root)
        tmp = Path(workdir) / "configs" / name
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        return load_config(tmp, extra + overrides)

    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    yours = {_key(o) for o in overrides}  # a user's --set of a key wins over this machine's
    dev = [o for o in device_overrides(cuda, cpu_bf16=not cuda and cpu_has_bf16())
           if _key(o) not in yours]  # fmt: skip
    train_dev = [o for o in dev if not o.startswith("serve.")]
    serve_dev = [o for o in dev if o.startswith("serve.")]
    return Configs(
        pretrain=load(QUICKSTART_FILES["pretrain"], train_dev),
        sft=load(QUICKSTART_FILES["sft"], train_dev),
        dpo=load(QUICKSTART_FILES["dpo"], train_dev),
        eval=load(QUICKSTART_FILES["eval"], []),
        serve=load(QUICKSTART_FILES["serve"], serve_dev),
        device=dev,
    )


# ---------------------------------------------------------------- output


class _Progress:
    """One line per stage above a stage progress bar (tqdm on stderr)."""

    def __init__(self, total: int) -> None:
        import sys

        from tqdm import tqdm

        # No bar in logs (CI, `ray job submit`): the stage lines alone say the same.
        self.bar = tqdm(total=total, unit="stage", leave=False, dynamic_ncols=True,
                        disable=not sys.stderr.isatty())  # fmt: skip
        self.n = 0

    def run(self, name: str, fn: Callable[[], str]) -> None:
        self.n += 1
        self.bar.set_description(name)
        t = time.perf_counter()
        detail = fn()
        self.bar.write(f"[{self.n}/{self.bar.total}] {name:<18} {detail}  "
                       f"({time.perf_counter() - t:.1f}s)")  # fmt: skip
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _quiet_ray_data() -> None:
    """The quickstart prints one line per stage; Ray Data's own bars would bury them (its log lines
    go to the log file with the rest of Ray's)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


# ---------------------------------------------------------------- stages


def _synth(corpus: Path, docs: int, seed: int) -> str:
    from data_pipelines.synth import FORMAT_VERSION, write_corpus

    marker = corpus / "synth.json"
    if marker.is_file():
        written = json.loads(marker.read_text())
        args = written.get("args", {})
        same = args.get("docs") == docs and args.get("seed") == seed
        if same and written.get("version") == FORMAT_VERSION:
            return f"{corpus} (reused)"
    write_corpus(str(corpus), docs=docs, seed=seed)
    return str(corpus)


def _tokenizer(cfg: RaylmConfig) -> str:
    from data_pipelines.tokenizer_train import train_tokenizer

    out = Path(cfg.tokenizer.output)
    resolved = out / "raylm_config.yaml"
    if (out / "tokenizer.json").is_file() and resolved.is_file():
        import yaml

        saved = yaml.safe_load(resolved.read_text()).get("tokenizer")
        if saved == cfg.tokenizer.model_dump(mode="json"):
            return f"{out} (reused)"
    train_tokenizer(cfg.tokenizer, cfg.data, progress=False)
    write_resolved(cfg, out)
    return str(out)


def _prepare(cfg: RaylmConfig) -> str:
    from data_pipelines.prepare import prepare

    result = prepare(cfg.data, cfg.data.tokenizer, progress=False)
    write_resolved(cfg, result.output)
    m = result.manifest
    detail = (
        f"{m['documents_kept']}/{m['documents_read']} docs, {m['tokens']} tokens, "
        f"{m['splits']['train']['rows']}+{m['splits']['validation']['rows']} rows"
    )
    return detail + (" (reused)" if result.skipped else "")


def _train(cfg: RaylmConfig, out: Outcome, key: str) -> str:
    """2 Ray Train workers under ZeRO-2; a finished run is reused without starting any worker."""
    from training.launcher import finished_checkpoint, plan_job, run_dir, train

    job = plan_job(cfg)
    reused = finished_checkpoint(run_dir(cfg), job) is not None
    if not reused:
        write_resolved(cfg, run_dir(cfg))
        train(cfg, job)
    rows = [json.loads(x) for x in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines() if x]
    evals = [r for r in rows if "eval_loss" in r]
    last = rows[-1] if rows else {}
    detail = f"step {last.get('step')}, loss {last.get('loss', float('nan')):.3f}"
    if evals and "eval_reward_accuracy" in evals[-1]:  # DPO: objective, chosen answers' ppl
        detail += (f", eval loss {evals[-1]['eval_loss']:.3f} (chosen-answer ppl"
                   f" {evals[-1]['perplexity']:.1f}), held-out reward accuracy"
                   f" {100 * evals[-1]['eval_reward_accuracy']:.0f}%")  # fmt: skip
    elif evals:
        detail += f", eval loss {evals[-1]['eval_loss']:.3f} (ppl {evals[-1]['perplexity']:.1f})"
    out.artifacts[f"{key} run"] = str(run_dir(cfg))
    out.numbers[key] = detail
    return detail + (" (reused)" if reused else "")


def _export(cfg: RaylmConfig, dest: Path, out: Outcome, key: str) -> str:
    """Export the run's newest intact checkpoint; an export of that same checkpoint is reused."""
    from training.export import PROVENANCE_NAME, export, find_checkpoint
    from training.launcher import run_dir

    ckpt, state = find_checkpoint(run_dir(cfg))
    out.artifacts[f"{key} export"] = str(dest)
    prov = dest / PROVENANCE_NAME
    if prov.is_file() and json.loads(prov.read_text()).get("checkpoint") == str(ckpt.resolve()):
        return f"{dest} (reused, step {state.step})"
    export(ckpt, dest)
    return f"{dest} (step {state.step})"


def _eval_one(cfg: RaylmConfig, model: Path, output: Path) -> tuple[dict[str, Any], bool]:
    """(eval.json for ``model``, reused): reused when the model's provenance and the eval config
    match the previous run's."""
    from cluster.evaluate import run_eval
    from training.evaluate import EVAL_NAME

    ecfg = cfg.eval.model_copy(update={"model": str(model), "output": str(output)})
    key = hashlib.sha256(
        (model / "provenance.json").read_bytes() + json.dumps(ecfg.model_dump(mode="json"),
                                                              sort_keys=True).encode()
    ).hexdigest()  # fmt: skip
    marker = output / ".quickstart_key"
    if marker.is_file() and marker.read_text() == key and (output / EVAL_NAME).is_file():
        return json.loads((output / EVAL_NAME).read_text()), True
    report = run_eval(ecfg, cfg.name)
    marker.write_text(key)
    return report, False


def _eval(cfg: Configs, out: Outcome) -> str:
    """The fine-tuned export against the pretrained-only control, and the preference-tuned one
    against the SFT model it started from, on the same held-out data."""
    from training.evaluate import compare_table, flat_metrics

    root = out.workdir / "eval"
    reports, reused = {}, True
    for key in ("pretrain", "sft", "dpo"):
        reports[key], was = _eval_one(cfg.eval, Path(out.artifacts[f"{key} export"]), root / key)
        reused &= was
    out.compare = compare_table(reports["pretrain"], reports["sft"])
    out.compare_dpo = compare_table(reports["sft"], reports["dpo"])
    out.artifacts["eval"] = f"{root}/{{pretrain,sft,dpo}}/eval.json"
    a, b, c = (flat_metrics(reports[k]) for k in ("pretrain", "sft", "dpo"))
    parts = []
    key = "sentiment accuracy"
    if key in a and key in b:
        out.numbers["sentiment"] = f"{b[key][0]:.1f}% (control {a[key][0]:.1f}%, n={b[key][1]})"
        parts.append(f"sentiment accuracy {b[key][0]:.1f}% vs control {a[key][0]:.1f}%")
    win = next((k for k in c if k.startswith("preference ") and k.endswith(" win_rate")), None)
    if win and win in b:
        out.numbers["preference"] = (f"win rate {c[win][0]:.1f}% after DPO (SFT start "
                                     f"{b[win][0]:.1f}%, n={c[win][1]})")  # fmt: skip
        parts.append(f"preference win rate {c[win][0]:.1f}% vs SFT {b[win][0]:.1f}%")
    return (", ".join(parts) or f"{len(b)} metrics") + (" (reused)" if reused else "")


def _check_port(host: str, port: int) -> None:
    """A busy local port fails Serve's proxy with an opaque actor error; say which key to change."""
    import ray

    from cluster.config import ConfigError

    if host not in ("127.0.0.1", "localhost") or ray.get_runtime_context().gcs_address is None:
        return
    problem = port_in_use(host, port)
    if problem:
        raise ConfigError(
            f"serve.port: {host}:{port} is in use ({problem}); choose another, e.g. "
            f"raylm quickstart --set serve.port={port + 1}"
        )


def port_in_use(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port``, or None. Binds as Serve's proxy (uvicorn)
    does, with SO_REUSEADDR: the connections a previous run's server closed wait a minute in
    TIME_WAIT on that port, and they do not stop a new server (nor should they stop a re-run)."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _chat(url: str, model: str, prompt: str) -> dict[str, Any]:
    import urllib.request

    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 32, "temperature": 0}  # fmt: skip
    req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _serve(cfg: RaylmConfig, out: Outcome) -> str:
    """Deploy the fine-tuned export on Ray Serve, ask one chat question over HTTP, shut down."""
    from serving.deployment import start, stop

    corpus = out.workdir / "corpus" / "sft" / "heldout" / "sentiment.jsonl"
    question = json.loads(corpus.read_text().splitlines()[0])
    _check_port(cfg.serve.host, cfg.serve.port)
    try:
        url = start(cfg.serve)
        reply = _chat(url, cfg.serve.models[0].name, question["messages"][0]["content"])
    finally:
        # Also after a failed start: a Serve left behind keeps its proxy's port for later apps.
        # One call, as `raylm serve` makes: Serve's shutdown, or the app's delete when other apps
        # run on the same Serve.
        stop(cfg.serve)
    choice = reply["choices"][0]
    out.answer = {"url": url, "question": question["messages"][0]["content"],
                  "reference": question["reference"], "answer": choice["message"]["content"],
                  "finish_reason": choice["finish_reason"]}  # fmt: skip
    return f"{url}: {choice['message']['content']!r} (finish_reason {choice['finish_reason']})"


# ---------------------------------------------------------------- summary


def _plots(cfg: Configs) -> list[str]:
    from training.launcher import run_dir
    from training.report import report

    paths: list[str] = []
    for c in (cfg.pretrain, cfg.sft, cfg.dpo):
        paths += [str(p) for p in report(run_dir(c)).plots]
    return paths


def _summary(cfg: Configs, out: Outcome, seconds: float) -> str:
    lines = [f"\nquickstart finished in {seconds:.0f}s", "", "Artifacts:"]
    lines += [f"  {k:<16} {v}" for k, v in out.artifacts.items()]
    lines += ["", "Numbers:"] + [f"  {k:<16} {v}" for k, v in out.numbers.items()]
    if out.compare:
        lines += ["", "Eval (A: pretrained-only control, B: fine-tuned):"]
        lines += ["  " + x for x in out.compare.splitlines()]
    if out.compare_dpo:
        lines += ["", "Eval (A: fine-tuned (SFT), B: preference-tuned (DPO) from it):"]
        lines += ["  " + x for x in out.compare_dpo.splitlines()]
    if out.answer:
        a = out.answer
        lines += ["", f"Chat over HTTP ({a['url']}/chat/completions):",
                  f"  user       {a['question']!r}", f"  assistant  {a['answer']!r} "
                  f"(finish_reason {a['finish_reason']}; reference {a['reference']!r})"]  # fmt: skip
    lines += ["", "Curves:"] + [f"  {p}" for p in _plots(cfg)]
    lines += ["", "Each stage alone (locally, or on a cluster as "
              "`ray job submit --working-dir . -- <command>`, see cluster/README.md):"]  # fmt: skip
    for cmd in _stage_commands():
        lines.append(f"  {cmd}")
    if cfg.device:
        sets = " ".join(f"--set {o}" for o in cfg.device if not o.startswith("serve."))
        lines.append(f"  (as this run did, add  {sets}  to the train commands)")
    return "\n".join(lines)


def _stage_commands() -> list[str]:
    f = {k: f"configs/{v}" for k, v in QUICKSTART_FILES.items()}
    return [
        f"raylm synth --out {DEFAULT_ROOT}/corpus",
        f"raylm tokenizer train {f['pretrain']}",
        f"raylm data prepare {f['pretrain']}   and   raylm data prepare {f['sft']}",
        f"raylm train {f['pretrain']}",
        f"raylm export {DEFAULT_ROOT}/train/quickstart --out {DEFAULT_ROOT}/export/pretrain",
        f"raylm train {f['sft']}",
        f"raylm export {DEFAULT_ROOT}/train/quickstart-sft --out {DEFAULT_ROOT}/export/sft",
        f"raylm data prepare {f['dpo']}   and   raylm train {f['dpo']}",
        f"raylm export {DEFAULT_ROOT}/train/quickstart-dpo --out {DEFAULT_ROOT}/export/dpo",
        f"raylm eval {f['eval']}   (and with --set eval.model=... for the pretrain and dpo "
        "exports, see its header)",
        f"raylm serve {f['serve']}",
    ]


def run_quickstart(
    workdir: str = DEFAULT_ROOT,
    overrides: list[str] | None = None,
    docs: int = 4000,
    verbose: bool = False,
) -> int:
    cfg = quickstart_configs(workdir, overrides or [])
    out = Outcome(workdir=Path(workdir))
    corpus = out.workdir / "corpus"
    out.artifacts.update(corpus=str(corpus), tokenizer=cfg.pretrain.tokenizer.output,
                         data=cfg.pretrain.data.output, sft_data=cfg.sft.data.output,
                         preference_data=cfg.dpo.data.output)  # fmt: skip
    started = time.perf_counter()
    if cfg.device:  # before the stage lines: why this machine's numbers differ from another's
        print(f"raylm: for this machine: {' '.join(cfg.device)} (--set KEY=VALUE to choose)",
              flush=True)  # fmt: skip
    bar = _Progress(STAGES)
    try:
        bar.run("synth", lambda: _synth(corpus, docs, cfg.pretrain.seed))
        with ray_session(cfg.pretrain.ray, out.workdir, verbose):
            _quiet_ray_data()
            bar.run("tokenizer train", lambda: _tokenizer(cfg.pretrain))
            bar.run("data prepare", lambda: _prepare(cfg.pretrain))
            bar.run("data prepare sft", lambda: _prepare(cfg.sft))
            bar.run("pretrain", lambda: _train(cfg.pretrain, out, "pretrain"))
            pre_export = Path(cfg.sft.model.init_from)
            bar.run("export", lambda: _export(cfg.pretrain, pre_export, out, "pretrain"))
            bar.run("fine-tune (SFT)", lambda: _train(cfg.sft, out, "sft"))
            sft_export = Path(cfg.serve.serve.models[0].path)
            bar.run("export sft", lambda: _export(cfg.sft, sft_export, out, "sft"))
            bar.run("data prepare pref", lambda: _prepare(cfg.dpo))
            bar.run("preference (DPO)", lambda: _train(cfg.dpo, out, "dpo"))
            dpo_export = out.workdir / "export" / "dpo"
            bar.run("export dpo", lambda: _export(cfg.dpo, dpo_export, out, "dpo"))
            bar.run("eval", lambda: _eval(cfg, out))
            bar.run("serve + chat", lambda: _serve(cfg.serve, out))
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    print(_summary(cfg, out, seconds), flush=True)
    summary = {"seconds": round(seconds, 1), "artifacts": out.artifacts, "numbers": out.numbers,
               "chat": out.answer}  # fmt: skip
    (out.workdir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 0
