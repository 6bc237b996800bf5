"""Batch inference benchmark: `raylm generate` (Ray Data, an actor pool of engines) against the same
prompts through one engine in one process and through sequential `transformers.generate`.

Sides, each run once per round and alternated so the load of other processes on a shared machine
hits all of them alike:

- ``ray``      : ``serving.batch_job.generate`` on a local Ray instance, ``--actors`` engine actors
  with 1 torch thread each, ``--batch-size`` rows per call (what ``raylm generate`` runs);
- ``engine-Nt``: ``serving.batch.GenerateBatch`` (the actors' own UDF, same engine budgets) called
  once on every row in this process with N torch threads (``--engine-threads``, default 1; 2 uses both cores in one process);
- ``procs``    : the rows split over ``--actors`` plain processes (spawned, no Ray), one such engine
  with 1 thread each, started together once all loaded: what the machine allows that many engines
  at the moment, Ray aside;
- ``hf-seq``   : ``model.generate`` one prompt after another, 1 thread (the first ``--hf-prompts``).

Every row generates exactly ``--max-tokens`` tokens (``ignore_eos``), greedy; the ray and engine
sides must write the same text for every row (checked). The ray side is reported including and
excluding its start-up: excluding it, output tokens are divided by the time the engines worked,
from the first call's start to the last call's end in any actor (``procs`` is timed the same way) (the actors' UDF is wrapped here to
record when each call ran); start-up (Ray Data planning, actor processes, imports, model load) is
the rest of the job's time and is reported separately, with ``ray.init``.

    python bench/generate_throughput.py                  # h256 l4 random Llama, 1024 prompts
    python bench/generate_throughput.py --rows 64 --repeat 1      # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve_load import make_model, make_prompts  # noqa: E402  (bench/ is the script's path)

OUT = Path(__file__).resolve().parent / "out" / "generate"
CALLS = OUT / "calls"  # one file per actor process: when each of its calls ran


def _timed_actor_class():
    """The actors' UDF, recording (start, end) of every call; Ray pickles it by value."""
    from serving.batch import GenerateBatch

    class TimedGenerateBatch(GenerateBatch):
        def __call__(self, batch):
            t0 = time.time()
            out = super().__call__(batch)
            with open(CALLS / f"{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps([t0, time.time()]) + "\n")
            return out

    return TimedGenerateBatch


def _engine_window() -> float:
    """Seconds from the first call's start to the last call's end over every actor."""
    spans = [json.loads(line) for f in CALLS.glob("*.jsonl") for line in f.open()]
    return max(end for _, end in spans) - min(start for start, _ in spans)


def write_prompts(path: Path, rows: int) -> list[str]:
    prompts = make_prompts(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts))
    )
    return prompts


def generate_cfg(model: Path, inputs: Path, out: Path, args):
    from serving.config import GenerateConfig

    return GenerateConfig(
        inputs=[str(inputs)],
        output=str(out),
        model=str(model),
        sampling={"temperature": 0.0, "max_tokens": args.max_tokens, "ignore_eos": True},
        num_actors=args.actors,
        actor_cpus=1.0,  # 1 torch thread per actor; 2 of the 4 logical CPUs Ray is given
        batch_size=args.batch_size,
        engine={
            "max_num_seqs": args.max_num_seqs,
            "max_waiting": args.max_num_seqs,
            "warmup": False,
            "torch_threads": 1,
        },  # fmt: skip
    )


def ray_side(cfg) -> tuple[float, float, int, list[str]]:
    """One `raylm generate` job: (seconds, engine window s, output tokens, texts in row order)."""
    import pyarrow.parquet as pq

    from serving import batch_job

    shutil.rmtree(cfg.output, ignore_errors=True)
    shutil.rmtree(CALLS, ignore_errors=True)
    CALLS.mkdir(parents=True)
    batch_job.GenerateBatch = _timed_actor_class()  # what _build_dataset maps
    t0 = time.perf_counter()
    result = batch_job.generate(cfg, progress=False)
    seconds = time.perf_counter() - t0
    texts = pq.read_table(Path(cfg.output) / "results", columns=["generated_text"]).column(0)
    return seconds, _engine_window(), result.manifest["completion_tokens"], texts.to_pylist()


def _rows(cfg, lo: int = 0, hi: int | None = None) -> dict:
    """Rows lo..hi of the prompts file, parsed as the job's first stage does."""
    import numpy as np

    from serving.batch import parse_files

    path = cfg.inputs[0]
    batch = {"path": np.array([path], dtype=object),
             "bytes": np.array([Path(path).read_bytes()], dtype=object)}  # fmt: skip
    rows = list(parse_files(batch, cfg.model_copy(update={"batch_size": 1 << 30}),
                            {path: (path, 0, "jsonl")}))[0]  # fmt: skip
    return {k: v[lo:hi] for k, v in rows.items()}


def engine_side(cfg, threads: int, lo: int = 0, hi: int | None = None) -> tuple:
    """Rows lo..hi through one GenerateBatch (one engine) in this process, as one call:
    (call start, call end, tokens, texts, load s)."""
    from serving.batch import GenerateBatch

    rows = _rows(cfg, lo, hi)
    t0 = time.time()
    engine_cfg = cfg.engine.model_copy(update={"torch_threads": threads})
    actor = GenerateBatch(cfg.model_copy(update={"engine": engine_cfg}))
    load = time.time() - t0
    t0 = time.time()
    out = actor(rows)
    t1 = time.time()
    actor.shutdown()
    return t0, t1, int(out["completion_tokens"].sum()), list(out["generated_text"]), load


def _half(cfg_json: str, lo: int, hi: int, ready, results) -> None:
    """One of the ceiling's processes (spawned): load its engine, wait for the others (``ready``,
    a barrier), then its rows through the engine with 1 thread; the result goes to ``results``."""
    from serving.batch import GenerateBatch
    from serving.config import GenerateConfig

    cfg = GenerateConfig.model_validate_json(cfg_json)
    rows = _rows(cfg, lo, hi)
    actor = GenerateBatch(cfg.model_copy(update={"engine": cfg.engine.model_copy(
        update={"torch_threads": 1})}))  # fmt: skip
    ready.wait()
    t0 = time.time()
    out = actor(rows)
    results.put((lo, t0, time.time(), int(out["completion_tokens"].sum()),
                 list(out["generated_text"])))  # fmt: skip
    actor.shutdown()


def processes_side(cfg, n: int) -> tuple[float, int, list[str]]:
    """The rows split over ``n`` plain processes, one engine each, no Ray, started together
    after every engine loaded: (seconds, tokens, texts). What the machine allows ``n`` engines
    at the moment, Ray's overhead aside."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    rows = len(_rows(cfg)["source"])
    cuts = [rows * i // n for i in range(n + 1)]
    ready, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_half, args=(cfg.model_dump_json(), cuts[i], cuts[i + 1], ready,
                                            results)) for i in range(n)]  # fmt: skip
    for p in procs:
        p.start()
    parts = sorted(results.get() for _ in procs)
    for p in procs:
        p.join()
    window = max(p[2] for p in parts) - min(p[1] for p in parts)
    return window, sum(p[3] for p in parts), [t for p in parts for t in p[4]]


def hf_side(model_dir: Path, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).eval()
    ids = [torch.tensor([tok(p, add_special_tokens=False)["input_ids"]]) for p in prompts]
    t0, tokens = time.perf_counter(), 0
    for x in ids:
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False)  # fmt: skip
        tokens += out.shape[1] - x.shape[1]
    return time.perf_counter() - t0, tokens


def one_round(model, cfg, prompts, args, turn: int) -> dict[str, float]:
    """Every side once; the order rotates by ``turn`` so no side always runs first or last."""
    r: dict[str, float] = {}
    texts: dict[str, list[str]] = {}

    def ray_job() -> None:
        seconds, window, tokens, texts["ray"] = ray_side(cfg)
        r["ray"], r["ray-excl"] = tokens / seconds, tokens / window
        r["start-up s"], r["ray job s"] = seconds - window, seconds

    def engine(threads: int) -> None:
        t0, t1, tokens, texts[f"engine-{threads}t"], r["engine load s"] = engine_side(cfg, threads)
        r[f"engine-{threads}t"] = tokens / (t1 - t0)

    def processes() -> None:
        window, tokens, texts["procs"] = processes_side(cfg, args.actors)
        r["procs"] = tokens / window

    def hf() -> None:
        seconds, tokens = hf_side(model, prompts[: args.hf_prompts], args.max_tokens)
        r["hf-seq"] = tokens / seconds

    sides = [ray_job, *(lambda t=t: engine(t) for t in args.engine_threads), processes, hf]
    for side in sides[turn % len(sides) :] + sides[: turn % len(sides)]:
        side()
    for name, got in texts.items():
        assert got == texts["ray"], f"{name} and ray wrote different text"
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="exported HF dir (default: a random Llama built here)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the built model")
    ap.add_argument("--layers", type=int, default=4, help="layers of the built model")
    ap.add_argument("--rows", type=int, default=1024, help="prompts in the job")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per row")
    ap.add_argument("--actors", type=int, default=2, help="engine actors of the ray side")
    ap.add_argument("--batch-size", type=int, default=32, help="generate.batch_size")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="engine slots (every engine)")
    ap.add_argument(
        "--engine-threads", default="1", help="torch threads of the engine sides, e.g. 1,2"
    )
    ap.add_argument("--hf-prompts", type=int, default=8, help="sequential generate() calls")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (medians are reported)")
    args = ap.parse_args()
    args.engine_threads = [int(x) for x in args.engine_threads.split(",")]

    import ray

    model = Path(args.model) if args.model else make_model(args.hidden, args.layers)
    prompts = write_prompts(OUT / "prompts" / "prompts.jsonl", args.rows)
    cfg = generate_cfg(model, OUT / "prompts" / "prompts.jsonl", OUT / "ray", args)
    load0 = os.getloadavg()[0]
    # Ray starts workers at nice 15; the in-process sides run at 0. Equal footing for the actors.
    os.environ.setdefault("RAY_worker_niceness", "0")
    t0 = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})  # fmt: skip
    init_s = time.perf_counter() - t0
    rounds = []
    for i in range(args.repeat):
        rounds.append(one_round(model, cfg, prompts, args, turn=i))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()),
              flush=True)  # fmt: skip
    ray.shutdown()
    report(rounds, args, model, init_s, load0)


def report(rounds: list[dict[str, float]], args, model: Path, init_s: float, load0: float) -> None:
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}

    def ratio(a: str, b: str) -> str:
        values = [r[a] / r[b] for r in rounds]
        return f"{statistics.median(values):.2f}x ({min(values):.2f}..{max(values):.2f})"

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load0:.1f} "
          f"before, {os.getloadavg()[0]:.1f} after")  # fmt: skip
    print(f"model: {model}, {args.rows} rows x {args.max_tokens} output tokens, greedy, "
          f"{args.actors} actors x 1 thread, batch_size {args.batch_size}, engine slots "
          f"{args.max_num_seqs}; medians of {len(rounds)} rounds")  # fmt: skip
    engines = [f"engine-{t}t" for t in args.engine_threads]
    for side in ("ray-excl", "ray", *engines, "procs", "hf-seq"):
        label = {"ray-excl": "ray (excl. start-up)", "ray": "ray (incl. start-up)",
                 "procs": f"{args.actors} processes"}.get(side, side)  # fmt: skip
        print(f"  {label:22} {med[side]:9.1f} output tokens/s")
    print(f"start-up: ray.init {init_s:.1f} s; the job's start-up {med['start-up s']:.1f} s of "
          f"{med['ray job s']:.1f} s (before the engines' first call and after their last); "
          f"engine load in-process {med['engine load s']:.1f} s")  # fmt: skip
    for t in args.engine_threads:
        print(f"ray excl. start-up / engine-{t}t: {ratio('ray-excl', f'engine-{t}t')}"
              + ("  (aim >= 1.7x)" if t == 1 else ""))  # fmt: skip
        print(f"ray incl. start-up / engine-{t}t: {ratio('ray', f'engine-{t}t')}")
    print(f"{args.actors} plain processes / {engines[0]} (what the machine allowed): "
          f"{ratio('procs', engines[0])}; ray excl. start-up / {args.actors} processes: "
          f"{ratio('ray-excl', 'procs')}")  # fmt: skip
    print(f"ray excl. start-up / hf-seq: {ratio('ray-excl', 'hf-seq')}; "
          f"{engines[0]} / hf-seq: {ratio(engines[0], 'hf-seq')}")  # fmt: skip
    print("outputs identical (ray, engine, processes: every row): yes")


if __name__ == "__main__":
    main()
