"""Run the data, training and serving benchmarks and record what they printed in bench/RESULTS.md.

    python bench/run_all.py                 # default sizes (tens of minutes on 2 cores)
    python bench/run_all.py --quick         # small sizes: checks the scripts, numbers are rough

Each benchmark measures its ratios side by side in one script (baseline and raylm interleaved), so
the numbers are comparable only within one block. The generated section of RESULTS.md (between the
markers) is replaced on every run with: date, machine, load average before/after, and per benchmark
the exact command, its wall time and the summary it printed; the hand-written analysis above the
markers stays.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


@dataclass(frozen=True)
class Bench:
    name: str
    baseline: str
    args: list[str]
    quick: list[str]
    summary_from: str  # the summary is what the script prints from the first line starting so


BENCHES = [
    Bench("data", "the same transforms in one process (sha256-identical output)",
          ["bench/data_throughput.py", "--repeat", "2"],
          ["bench/data_throughput.py", "--docs", "20000", "--repeat", "1"], "corpus:"),
    Bench("training", "a bare PyTorch loop with AdamW (1 process) and torchrun DDP (2 processes)",
          ["bench/train_throughput.py", "--repeat", "3"],
          ["bench/train_throughput.py", "--repeat", "1", "--steps", "10", "--hidden", "128"],
          "\nmodel"),
    Bench("serving", "the engine called directly, and sequential transformers.generate",
          ["bench/serve_load.py", "--levels", "1,8,16,32"],
          ["bench/serve_load.py", "--levels", "1,16", "--requests", "32"], "machine:"),
    Bench("generate", "the engine in one process, and sequential transformers.generate",
          ["bench/generate_throughput.py", "--repeat", "3"],
          ["bench/generate_throughput.py", "--rows", "128", "--repeat", "1"], "machine:"),
]  # fmt: skip


def _machine() -> str:
    import ray
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, {gpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")  # fmt: skip


def _run(bench: Bench, quick: bool) -> tuple[str, str, float, int]:
    argv = [sys.executable] + (bench.quick if quick else bench.args)
    cmd = "python " + " ".join(argv[1:])
    print(f"== {bench.name}: {cmd}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    out = proc.stdout
    start = out.find(bench.summary_from)
    summary = (out[start:] if start >= 0 else out[-3000:]).strip()
    if proc.returncode:
        summary += "\n" + proc.stderr[-2000:]
    print(summary, flush=True)
    return cmd, summary, seconds, proc.returncode


def _section(blocks: list[str], quick: bool) -> str:
    head = [
        BEGIN,
        "## Latest `bench/run_all.py`" + (" (--quick: rough numbers)" if quick else ""),
        "",
        f"Date {time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {_machine()}.",
        "",
    ]
    return "\n".join(head + blocks + [END]) + "\n"


def _write(section: str) -> None:
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1 :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (checks the scripts)")
    ap.add_argument("--only", choices=[b.name for b in BENCHES], action="append",
                    help="run only these benchmarks (repeatable)")  # fmt: skip
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = ap.parse_args(argv)
    blocks, failed = [], 0
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        load0 = os.getloadavg()[0]
        cmd, summary, seconds, rc = _run(bench, args.quick)
        failed += rc != 0
        blocks += [
            f"### {bench.name} (baseline: {bench.baseline})",
            "",
            f"Command: `{cmd}` ({seconds:.0f} s, load average {load0:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after{'; FAILED rc ' + str(rc) if rc else ''})",
            "",
            "```",
            summary,
            "```",
            "",
        ]
    if not args.no_write:
        _write(_section(blocks, args.quick))
        print(f"wrote {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
