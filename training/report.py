"""``raylm report RUN_DIR``: PNG curves from ``metrics.jsonl`` and a one-screen text summary.

Reads only the run dir (no Ray, no torch), so it runs on a laptop against a synced run dir, or
against an ``s3://`` run dir directly (endpoint and credentials from the environment).
Plots go to ``RUN_DIR/plots/``: ``loss.png`` (train and eval loss), ``lr.png``,
``tokens_per_s.png`` and, when the run evaluated, ``eval.png`` (eval loss and perplexity); DPO runs
add ``rewards.png`` (rewards of chosen and rejected answers and their margin, train and held-out)
and ``reward_accuracy.png``.
"""

from __future__ import annotations

import json
import math
import posixpath
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.records import EVENTS_NAME, METRICS_NAME, read_events

__all__ = ["Report", "read_metrics", "report", "summarize"]


@dataclass
class Report:
    plots: list[Path | str]  # s3:// runs: the plots' URIs
    summary: str


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` by step; a malformed line is an error naming file:line."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (is {run_dir} a `raylm train` run dir?)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            int(row["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a metrics row ({exc})") from None
        rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a finite number under ``key``."""
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _plot(path: Path, title: str, curves: list[tuple[str, list[int], list[float]]],
          log_y: bool = False) -> Path | None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for label, xs, ys in curves:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
    ax.set(title=title, xlabel="step")
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    keys = ("loss", "eval_loss", "lr", "tokens_per_s", "perplexity", "rewards_chosen",
            "rewards_rejected", "reward_margin", "eval_reward_margin", "reward_accuracy",
            "eval_reward_accuracy")  # fmt: skip
    s = {k: _series(rows, k) for k in keys}
    made = [
        _plot(out / "loss.png", "loss", [("train", *s["loss"]), ("eval", *s["eval_loss"])]),
        _plot(out / "lr.png", "learning rate", [("lr", *s["lr"])]),
        _plot(
            out / "tokens_per_s.png", "tokens/s (all ranks)", [("tokens/s", *s["tokens_per_s"])]
        ),  # fmt: skip
        _plot(
            out / "eval.png",
            "held-out eval",
            [("eval loss", *s["eval_loss"]), ("perplexity", *s["perplexity"])],
            log_y=True,
        ),  # fmt: skip
        _plot(
            out / "rewards.png",
            "DPO rewards: beta x log-prob ratio to the reference",
            [
                ("chosen", *s["rewards_chosen"]),
                ("rejected", *s["rewards_rejected"]),
                ("margin", *s["reward_margin"]),
                ("held-out margin", *s["eval_reward_margin"]),
            ],
        ),  # fmt: skip
        _plot(
            out / "reward_accuracy.png",
            "DPO reward accuracy: chosen reward > rejected reward",
            [("train", *s["reward_accuracy"]), ("held-out", *s["eval_reward_accuracy"])],
        ),  # fmt: skip
    ]
    return [p for p in made if p is not None]


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def summarize(
    run_dir: str | Path,
    rows: list[dict[str, Any]],
    *,
    shown: str = "",
    checkpoints: list[str] | None = None,
) -> str:
    """At most ~12 lines: where the run stands and how it went. ``shown`` and ``checkpoints``
    stand in for the run dir's path and listing when ``run_dir`` is a local copy (S3)."""
    last = rows[-1]
    _, losses = _series(rows, "loss")
    ev_steps, ev = _series(rows, "eval_loss")
    _, tps = _series(rows, "tokens_per_s")
    resumes = [e for e in read_events(run_dir) if e.get("event") == "resume"]
    if checkpoints is None:
        checkpoints = [p.name for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()]
    ckpts = sorted(checkpoints)
    lines = [
        f"run          {shown or Path(run_dir).resolve()}",
        f"steps        {last['step']} logged, {len(rows)} rows; tokens seen "
        f"{_fmt(last.get('tokens_seen'), ',')}",
        f"train loss   first {_fmt(losses[0] if losses else None)}  last "
        f"{_fmt(losses[-1] if losses else None)}  min {_fmt(min(losses) if losses else None)}",
    ]
    if ev:
        best = min(range(len(ev)), key=ev.__getitem__)
        lines.append(f"eval loss    last {_fmt(ev[-1])} (ppl {_fmt(math.exp(min(ev[-1], 50.0)))})  "
                     f"best {_fmt(ev[best])} at step {ev_steps[best]}")  # fmt: skip
    _, acc = _series(rows, "eval_reward_accuracy")
    if acc:
        _, margin = _series(rows, "eval_reward_margin")
        lines.append(f"preference   held-out reward accuracy last {_fmt(acc[-1], '.1%')}  "
                     f"margin last {_fmt(margin[-1] if margin else None)}")  # fmt: skip
    if tps:
        lines.append(f"tokens/s     median {_fmt(statistics.median(tps), ',.0f')}  "
                     f"last {_fmt(tps[-1], ',.0f')}")  # fmt: skip
    lines += [
        f"lr           last {_fmt(last.get('lr'))}   grad norm last {_fmt(last.get('grad_norm'))}"
        + (f"   mfu last {_fmt(last['mfu'], '.2%')}" if last.get("mfu") is not None else ""),
        f"resumes      {len(resumes)}"
        + "".join(f"; step {e['step']} from {Path(e['checkpoint']).name}" for e in resumes[-3:]),
        f"checkpoints  {', '.join(ckpts) or 'none'}",
    ]
    return "\n".join(lines)


def report(run_dir: str | Path, filesystem: Any = None) -> Report:
    """Write the plots under ``run_dir/plots`` and return them with the summary text."""
    if str(run_dir).startswith("s3://"):
        return _s3_report(str(run_dir).rstrip("/"), filesystem)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{Path(run_dir) / METRICS_NAME}: empty (no step logged yet)")
    return Report(plots=_plots(rows, Path(run_dir) / "plots"), summary=summarize(run_dir, rows))


def _s3_report(uri: str, fs: Any) -> Report:
    """``report`` of an S3 run dir: its metrics and events read through a temp copy, the plots
    uploaded to ``RUN/plots/``."""
    from training.storage import Mirror, fs_path, list_checkpoints, parse_s3, s3_filesystem

    fs = fs or s3_filesystem(parse_s3(uri))
    with tempfile.TemporaryDirectory(prefix="raylm_report_") as tmp:
        mirror = Mirror(fs, fs_path(uri), Path(tmp))
        if not mirror.exists(METRICS_NAME):
            raise FileNotFoundError(f"{uri}/{METRICS_NAME}: no metrics (is {uri} a `raylm train` "
                                    "run dir?)")  # fmt: skip
        mirror.pull([METRICS_NAME, EVENTS_NAME])
        try:
            rows = read_metrics(tmp)
        except ValueError as exc:
            raise ValueError(str(exc).replace(tmp, uri)) from None
        if not rows:
            raise ValueError(f"{uri}/{METRICS_NAME}: empty (no step logged yet)")
        ckpts = [posixpath.basename(p) for p in list_checkpoints(fs, fs_path(uri))]
        plots = _plots(rows, Path(tmp) / "plots")
        for plot in plots:
            mirror.put(f"plots/{plot.name}", plot.read_bytes())
        summary = summarize(tmp, rows, shown=uri, checkpoints=ckpts)
    return Report(plots=[f"{uri}/plots/{p.name}" for p in plots], summary=summary)
