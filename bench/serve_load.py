"""Serving benchmark: the Ray Serve endpoint against the engine called directly and against sequential
`transformers.generate`, on the same model, prompts and thread count, in one run.

At each concurrency level (default 1, 8, 16, 32) it reports requests/s, output tokens/s, time to first
token and end-to-end latency (p50/p99) for:

- ``serve``  : streaming POST /v1/completions over HTTP on 127.0.0.1 through Ray Serve's proxy;
- ``direct`` : the same, sent to the replica's own port (``serve.direct_ingress``: no proxy hop);
- ``engine`` : ``Engine.submit`` in this process (no HTTP, no Ray): Serve's added cost is the gap;
- ``hf-seq`` : ``model.generate`` one request after another (batching gain is engine or serve / this);
- ``*-1t``   : at concurrency 1 only, one-token non-streamed requests to the engine, through the
  proxy and direct: their end-to-end difference is Serve's added latency per request (with
  ``--max-tokens`` of decoding in it, the run-to-run noise would be larger than the latency).

Every request generates exactly ``--max-tokens`` tokens (``ignore_eos``) with greedy decoding. TTFT is
the first token with text on both sides (the HTTP layer sends no frame for a token whose text is still
pending, e.g. half a UTF-8 character). Each level runs ``--repeats`` rounds, and each round runs the
engine and the endpoint back to back, so the load of other processes on a shared machine hits both
alike; tables show medians over rounds, and Serve's added latency at concurrency 1 is the median of
the per-round differences.

    python bench/serve_load.py                           # small random Llama built on the fly
    python bench/serve_load.py --model runs/quickstart/export/sft --levels 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = Path(__file__).resolve().parent / "out" / "serve"


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    tokens: int


def make_model(hidden: int, layers: int) -> Path:
    """A random-init Llama + BPE tokenizer trained on the synthetic corpus (cached under bench/out)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from data_pipelines.synth import write_corpus
    from data_pipelines.tokenizer_train import EOS, PAD, build_tokenizer

    out = OUT / f"model-h{hidden}-l{layers}"
    if (out / "config.json").is_file():
        return out
    corpus = OUT / "corpus"
    write_corpus(str(corpus), docs=500, seed=0, shards=1)
    texts = [
        json.loads(line)["text"]
        for line in (corpus / "pretrain" / "shard-00000.jsonl").read_text().splitlines()
    ]
    tok = build_tokenizer(iter(texts), vocab_size=2048, min_frequency=2, max_length=1024)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    eos, pad = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(PAD)
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=pad)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def make_prompts(n: int) -> list[str]:
    base = [
        "Ben was a librarian in the town of Oakvale. He had a parrot named",
        "Review: I watched Burning Garden on a rainy Sunday. I would happily",
        "Facts: Leo's favorite color is black. David lives in Northgate. Question:",
        "Rewrite in Zorbish: the teacher walks behind every red small ball",
    ]
    return [f"{base[i % len(base)]} {i}" for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(samples: list[Sample], wall_s: float) -> dict[str, float]:
    ttft = [s.ttft_s * 1e3 for s in samples]
    e2e = [s.e2e_s * 1e3 for s in samples]
    return {
        "req_s": len(samples) / wall_s,
        "tok_s": sum(s.tokens for s in samples) / wall_s,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": pct(ttft, 0.99),
        "e2e_p50": statistics.median(e2e),
        "e2e_p99": pct(e2e, 0.99),
    }


async def run_level(
    one: Callable[[int], Awaitable[Sample]], requests: int, concurrency: int
) -> dict[str, float]:
    """``requests`` calls of ``one(i)``, at most ``concurrency`` in flight."""
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> Sample:
        async with gate:
            return await one(i)

    t0 = time.perf_counter()
    samples = await asyncio.gather(*(gated(i) for i in range(requests)))
    return summarize(list(samples), time.perf_counter() - t0)


def engine_caller(
    engine, prompts: list[str], max_tokens: int
) -> Callable[[int], Awaitable[Sample]]:
    from serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    async def one(i: int) -> Sample:
        t0 = time.perf_counter()
        first, n = None, 0
        async for ev in engine.submit(ids[i % len(ids)], params):
            if ev.text or ev.finish_reason:  # what the HTTP layer turns into a frame
                first = first or time.perf_counter()
            n += len(ev.token_ids)
        return Sample(first - t0, time.perf_counter() - t0, n)

    return one


def _completion_body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    """Greedy, fixed-length completions, so every request costs the same tokens."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def http_caller(session, url: str, model: str, prompts: list[str], max_tokens: int):
    """Streaming completions; TTFT = first SSE chunk carrying a choice, tokens from usage.

    The client is aiohttp (as vLLM's serving benchmark uses): on a 2-core machine the load
    generator shares the CPU with the server, and httpx's streaming parse cost about 3x aiohttp's
    CPU per token here, which would be billed to Serve.
    """

    async def one(i: int) -> Sample:
        body = _completion_body(model, prompts[i % len(prompts)], max_tokens, stream=True)
        t0 = time.perf_counter()
        first, n = None, 0
        async with session.post(url + "/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:  # one SSE line at a time
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # a failure after the 200: the run's numbers would lie
                    raise RuntimeError(f"request {i}: error event {chunk['error']}")
                if chunk.get("choices"):
                    first = first or time.perf_counter()
                if chunk.get("usage"):
                    n = chunk["usage"]["completion_tokens"]
        if first is None:
            raise RuntimeError(f"request {i}: the stream ended without a token")
        return Sample(first - t0, time.perf_counter() - t0, n)

    return one


def json_caller(session, url: str, model: str, prompts: list[str], max_tokens: int):
    """Non-streaming completions: one Serve hop per request (TTFT = end-to-end)."""

    async def one(i: int) -> Sample:
        body = _completion_body(model, prompts[i % len(prompts)], max_tokens, stream=False)
        t0 = time.perf_counter()
        async with session.post(url + "/completions", json=body) as r:
            r.raise_for_status()
            usage = (await r.json())["usage"]
        dt = time.perf_counter() - t0
        return Sample(dt, dt, usage["completion_tokens"])

    return one


def hf_sequential(model_dir: Path, prompts: list[str], max_tokens: int) -> Callable[[], dict]:
    """One request at a time through model.generate (no batching): the baseline for batching gain.

    Returns a function that runs one round of ``prompts`` and summarizes it; every round of every
    level runs it next to the other modes, so the gain is a ratio within one round.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).eval()
    ids = [torch.tensor([tok(p, add_special_tokens=False)["input_ids"]]) for p in prompts]

    def one_round() -> dict[str, float]:
        samples = []
        t_all = time.perf_counter()
        for x in ids:
            t0 = time.perf_counter()
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
            )
            dt = time.perf_counter() - t0
            samples.append(Sample(float("nan"), dt, out.shape[1] - x.shape[1]))
        return summarize(samples, time.perf_counter() - t_all)

    one_round()  # warm-up
    return one_round


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


Runs = dict[str, dict[int, list[dict[str, float]]]]  # mode -> level -> one summary per round


async def run_levels(
    callers: dict[str, Callable[[int], Awaitable[Sample]]], hf: Callable[[], dict], args
) -> Runs:
    """Every level ``--repeats`` times; within a round the modes run back to back (interleaved),
    ``hf-seq`` first.

    The one-token modes (``*-1t``) run at concurrency 1 only.
    """
    for one in callers.values():
        await run_level(one, 2, 1)  # warm-up (connection pool, proxy routes, kernels)
    runs: Runs = {"hf-seq": {}, **{name: {} for name in callers}}
    for c in args.levels:
        for _ in range(args.repeats):
            runs["hf-seq"].setdefault(c, []).append(hf())
            for name, one in callers.items():
                if not name.endswith("-1t") or c == 1:
                    n = max(args.requests, 2 * c)
                    runs[name].setdefault(c, []).append(await run_level(one, n, c))
    return runs


def direct_url() -> str | None:
    """The replica's own address (serve.direct_ingress): Serve allocates ports from 30000."""
    import httpx

    for port in range(30000, 30064):
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
        except httpx.HTTPError:
            continue
        if r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["bench"]:
            return f"http://127.0.0.1:{port}/v1"
    return None


async def _engine_and_http(engine, hf, url: str | None, prompts, args) -> Runs:
    import aiohttp

    callers = {
        "engine": engine_caller(engine, prompts, args.max_tokens),
        "engine-1t": engine_caller(engine, prompts, 1),
    }
    conn = aiohttp.TCPConnector(limit=2 * max(args.levels) + 4)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        if url is not None:
            callers["serve"] = http_caller(session, url, "bench", prompts, args.max_tokens)
            callers["serve-1t"] = json_caller(session, url, "bench", prompts, 1)
            direct = direct_url()
            if direct is None:
                print("no replica answers on its own port: the direct rows are left out")
            else:
                callers["direct"] = http_caller(session, direct, "bench", prompts, args.max_tokens)
                callers["direct-1t"] = json_caller(session, direct, "bench", prompts, 1)
        return await run_levels(callers, hf, args)


def measure(model_dir, prompts, hf, args) -> Runs:
    """The engine in this process and (unless --skip-serve) the Serve endpoint, both alive."""
    import ray
    from ray import serve

    from serving.config import EngineConfig, ServeConfig
    from serving.deployment import start
    from serving.engine import Engine

    engine_cfg = {"torch_threads": args.threads, "max_num_seqs": max(args.levels)}
    engine = Engine(model_dir, EngineConfig(**engine_cfg))
    url = None
    try:
        if not args.skip_serve:
            # Ray starts workers (Serve's proxy and replica) at nice 15, the engine here runs at 0:
            # on a busy machine that alone would bill the scheduler's preference to Serve.
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
            cfg = ServeConfig(
                models=[{"name": "bench", "path": str(model_dir)}],
                port=free_port(),
                num_cpus=args.threads,
                engine=engine_cfg,
                autoscaling={"min_replicas": 1, "max_replicas": 1},
                direct_ingress=True,
                stream_interval=args.stream_interval,
                user_code_thread=args.user_code_thread,
            )
            url = start(cfg)
        return asyncio.run(_engine_and_http(engine, hf, url, prompts, args))
    finally:
        engine.shutdown()
        if url is not None:
            serve.shutdown()
            ray.shutdown()


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def print_table(rows: list[tuple[str, int, dict[str, float]]]) -> None:
    head = f"{'mode':8} {'conc':>4} {'req/s':>8} {'tok/s':>9} {'ttft p50':>9} {'ttft p99':>9} {'e2e p50':>9} {'e2e p99':>9}"
    print(head + "   (latencies in ms)")
    for mode, c, r in rows:
        print(
            f"{mode:8} {c:>4} {r['req_s']:8.2f} {r['tok_s']:9.1f} {r['ttft_p50']:9.1f} "
            f"{r['ttft_p99']:9.1f} {r['e2e_p50']:9.1f} {r['e2e_p99']:9.1f}"
        )


def _paired(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> str:
    """b - a per round: median (min..max) in ms."""
    d = [y[key] - x[key] for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(d):+.1f} ms ({min(d):+.1f}..{max(d):+.1f})"


def print_ratios(runs: Runs, levels: list[int]) -> None:
    eng, srv = runs["engine"], runs.get("serve", {})
    if 1 in levels and srv:
        e, s, e1, s1 = eng[1], srv[1], runs["engine-1t"][1], runs["serve-1t"][1]
        print(f"serve added latency at c=1, median over {len(e)} interleaved rounds (min..max):")
        print(f"  streamed TTFT p50 {_paired(e, s, 'ttft_p50')} (aim <= 5)")
        print(f"  streamed e2e p50 {_paired(e, s, 'e2e_p50')}")
        print(f"  one-token non-streamed e2e p50 {_paired(e1, s1, 'e2e_p50')} (aim <= 3)")
        if "direct" in runs:
            d, d1 = runs["direct"][1], runs["direct-1t"][1]
            print(f"  direct ingress (replica port, no proxy): streamed TTFT p50 "
                  f"{_paired(e, d, 'ttft_p50')}, streamed e2e p50 {_paired(e, d, 'e2e_p50')}, "
                  f"one-token non-streamed e2e p50 {_paired(e1, d1, 'e2e_p50')}")  # fmt: skip
    for c in levels:
        gains = [f"{mode} {_ratio(runs[mode][c], runs['hf-seq'][c])}"
                 for mode in ("engine", "serve", "direct") if c in runs.get(mode, {})]  # fmt: skip
        aim = " (aim >= 6x)" if c == 16 else ""
        print(f"batching gain at c={c} (output tokens/s over sequential generate, median of "
              f"per-round ratios, min..max): {', '.join(gains)}{aim}")  # fmt: skip


def _ratio(a: list[dict[str, float]], b: list[dict[str, float]]) -> str:
    """a / b tokens/s per round: median (min..max)."""
    r = [x["tok_s"] / y["tok_s"] for x, y in zip(a, b, strict=True)]
    return f"{statistics.median(r):.1f}x ({min(r):.1f}..{max(r):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="exported HF dir (default: a random Llama built here)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the built model")
    ap.add_argument("--layers", type=int, default=4, help="layers of the built model")
    ap.add_argument("--levels", default="1,8,16,32", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=16, help="requests per level (>= 2 x level)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per level")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    # More torch threads than free cores is catastrophic next to Ray's own processes (OpenMP
    # barriers spin while a thread is descheduled): on a 2-core box keep 1.
    ap.add_argument("--threads", type=int, default=1, help="torch threads on every side")
    ap.add_argument("--hf-requests", type=int, default=4, help="sequential generate() calls")
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="serve.stream_interval: tokens per streamed frame after the first",
    )
    ap.add_argument(
        "--user-code-thread",
        action="store_true",
        help="serve.user_code_thread: the app on its own loop thread (Serve's default)",
    )
    ap.add_argument("--skip-serve", action="store_true", help="engine and generate only")
    args = ap.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]

    import torch

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model) if args.model else make_model(args.hidden, args.layers)
    prompts = make_prompts(64)
    hf = hf_sequential(model_dir, prompts[: args.hf_requests], args.max_tokens)
    load0 = os.getloadavg()[0]
    runs = measure(model_dir, prompts, hf, args)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, "
        f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"model: {model_dir}, {args.max_tokens} output tokens per request, greedy, "
        f"medians of {args.repeats} rounds, serve.stream_interval {args.stream_interval}, "
        f"serve.user_code_thread {args.user_code_thread}"
    )
    rows = [("hf-seq", 1, medians([r for rounds in runs["hf-seq"].values() for r in rounds]))]
    for mode, levels in runs.items():
        if mode != "hf-seq":
            rows += [(mode, c, medians(rounds)) for c, rounds in levels.items()]
    print_table(rows)
    print_ratios(runs, args.levels)


if __name__ == "__main__":
    main()
