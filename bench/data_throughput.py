"""Data benchmark: `data prepare` on Ray against the same pure transforms in one process.

Both sides run parse -> normalize -> dedup -> tokenize -> pack -> write on the same corpus in the same
script, with threads pinned equally (OMP_NUM_THREADS=1, TOKENIZERS_PARALLELISM=false) and the same
batch size. The single-process side calls the very functions the Ray pipeline maps (parse_and_clean,
TokenizeBatch, the packers and the writer), and both must produce sha256-identical parquet files.

Start-up (ray.init, actor pool, tokenizer loads, pipeline planning) is reported separately: it is
measured as the wall time of `data prepare` on a one-shard corpus of a few documents.

Baseline and Ray runs alternate (--repeat pairs) so both see the same background load; ratios are
medians over the pairs.

Peak memory: the highest sum of RSS over the driver and every Ray worker process, sampled every 0.2 s,
on 1x and (with --scale N) Nx the corpus, the larger corpus in N times as many shards of the same size
(a worker holds one shard's bytes, so memory follows shard size and the in-flight shard count).

    python bench/data_throughput.py                 # ~57 MB corpus
    python bench/data_throughput.py --scale 4       # also the memory ratio at 4x
"""

from __future__ import annotations

import argparse
import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from data_pipelines.config import DataConfig  # noqa: E402
from data_pipelines.dedup import DedupShard, partition_of  # noqa: E402
from data_pipelines.prepare import _consume, _Tally, parse_and_clean, prepare  # noqa: E402
from data_pipelines.readers import expand_inputs  # noqa: E402
from data_pipelines.tokenize import TokenizeBatch  # noqa: E402
from data_pipelines.writer import ShardWriter  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "data"


def make_corpus(docs: int, tag: str, shards: int = 8) -> Path:
    from data_pipelines.synth import write_corpus

    corpus = OUT / f"corpus-{tag}"
    meta = corpus / "synth.json"
    if not meta.is_file() or json.loads(meta.read_text())["args"] != {
        "docs": docs,
        "seed": 0,
        "shards": shards,
    }:
        write_corpus(str(corpus), docs=docs, seed=0, shards=shards)
    return corpus / "pretrain"


def make_tokenizer(corpus: Path) -> Path:
    from data_pipelines.tokenizer_train import build_tokenizer

    out = OUT / "tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    texts = []
    for line in next(iter(sorted(corpus.glob("*.jsonl")))).open():
        texts.append(json.loads(line)["text"])
        if len(texts) >= 20000:
            break
    build_tokenizer(iter(texts), 4096, 2, 2048).save_pretrained(str(out))
    return out


def single_process(cfg: DataConfig, tokenizer: Path, out: Path) -> tuple[float, dict]:
    """The pipeline's own transforms, called in order in this process."""
    start = time.perf_counter()
    files = expand_inputs(cfg.inputs)
    from data_pipelines.tokenize import load_tokenizer

    eos = load_tokenizer(tokenizer).eos_token_id
    tokenize = TokenizeBatch(str(tokenizer), cfg.mode, cfg.seq_len, eos_id=eos)
    shards = [DedupShard() for _ in range(cfg.dedup.partitions)]
    writers = {s: ShardWriter(out / s, cfg.rows_per_file, False) for s in ("train", "validation")}
    from data_pipelines.pack import DocumentPacker

    pad = load_tokenizer(tokenizer).pad_token_id
    packers = {s: DocumentPacker(cfg.seq_len, pad) for s in writers}
    tally = _Tally()
    for path in files.paths:
        blob = Path(path).read_bytes()
        batch = parse_and_clean(
            {"path": np.array([path], dtype=object), "bytes": np.array([blob], dtype=object)},
            cfg,
            files.display,
        )
        for lo in range(0, len(batch["reason"]), cfg.batch_size):
            part = tokenize({k: v[lo : lo + cfg.batch_size] for k, v in batch.items()})
            reasons = part["reason"].copy()  # dedup after tokenizing, in order, as the driver does
            for i, (r, h) in enumerate(zip(reasons, part["hash"], strict=True)):
                if not r:
                    shard = shards[partition_of(h, len(shards))]
                    if not shard.first_seen([int.from_bytes(h[8:16], "big")])[0]:
                        reasons[i] = "duplicate"
            part["reason"] = reasons
            _consume(part, cfg, packers, writers, tally)
    for s, packer in packers.items():
        for row in packer.flush():
            writers[s].add(row)
        writers[s].close()
    tokens = sum(w.tokens for w in writers.values())
    checksums = {f"{s}/{n}": h for s, w in writers.items() for n, h in w.checksums.items()}
    return time.perf_counter() - start, {"tokens": tokens, "checksums": checksums}


class PeakRss:
    """Highest summed RSS of this process and all Ray worker processes (``ray::*``)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = psutil.Process().memory_info().rss
        for p in psutil.process_iter(["cmdline"]):
            try:
                cmd = p.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::"):
                    total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ray_prepare(cfg: DataConfig, tokenizer: Path) -> tuple[float, dict, int]:
    shutil.rmtree(cfg.output, ignore_errors=True)
    with PeakRss() as mem:
        start = time.perf_counter()
        result = prepare(cfg, str(tokenizer), progress=False)
        seconds = time.perf_counter() - start
    return seconds, result.manifest, mem.peak


OBJECT_STORE_MB: int | None = 512


def data_cfg(inputs: Path, output: Path, actors: int) -> DataConfig:
    return DataConfig(
        inputs=[str(inputs)],
        output=str(output),
        seq_len=512,
        validation_fraction=0.01,
        num_actors=actors,
        actor_cpus=1.0,
        batch_size=512,
        rows_per_file=4096,
        object_store_mb=OBJECT_STORE_MB,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000, help="synthetic documents (1x corpus)")
    ap.add_argument("--actors", type=int, default=2, help="processing actors")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved baseline/Ray pairs")
    ap.add_argument("--scale", type=int, default=0, help="also measure peak RSS at this multiple")
    ap.add_argument(
        "--object-store-mb", type=int, default=512, help="data.object_store_mb; 0: none"
    )
    args = ap.parse_args()
    global OBJECT_STORE_MB
    OBJECT_STORE_MB = args.object_store_mb or None

    import ray

    corpus = make_corpus(args.docs, "1x")
    size_mb = sum(f.stat().st_size for f in corpus.glob("*.jsonl")) / 1e6
    tokenizer = make_tokenizer(corpus)
    tiny = OUT / "tiny"
    tiny.mkdir(parents=True, exist_ok=True)
    (tiny / "a.jsonl").write_text(json.dumps({"text": "a tiny document for start-up"}) + "\n")

    t0 = time.perf_counter()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    init_s = time.perf_counter() - t0
    pairs, peak1 = [], 0
    for i in range(args.repeat):
        # Interleaved so both sides see the same background load on a shared machine.
        base_s, base = single_process(data_cfg(corpus, OUT / "base", 1), tokenizer, OUT / "base")
        tiny_s, _, _ = ray_prepare(data_cfg(tiny, OUT / "tiny-out", args.actors), tokenizer)
        ray_s, manifest, peak = ray_prepare(data_cfg(corpus, OUT / "ray", args.actors), tokenizer)
        assert manifest["checksums"] == base["checksums"], "Ray and single-process outputs differ"
        peak1 = max(peak1, peak)
        pairs.append((base_s, ray_s, tiny_s))
        print(
            f"pair {i + 1}: single {base_s:.1f} s, ray {ray_s:.1f} s, one-document job "
            f"{tiny_s:.1f} s",
            flush=True,
        )

    tokens = manifest["tokens"]
    base_s, ray_s, tiny_s = (statistics.median(p[k] for p in pairs) for k in range(3))
    incl = statistics.median(b / r for b, r, _ in pairs)
    excl = statistics.median(b / max(r - t, 1e-9) for b, r, t in pairs)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"ray {ray.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"corpus: {size_mb:.1f} MB, {manifest['documents_read']} docs, {tokens} tokens kept")
    print(f"single process : {base_s:7.1f} s  {tokens / base_s:10.0f} tokens/s  (median)")
    print(
        f"ray prepare    : {ray_s:7.1f} s  {tokens / ray_s:10.0f} tokens/s  ({args.actors} actors)"
    )
    print(f"start-up       : ray.init {init_s:.1f} s; one-document job {tiny_s:.1f} s (median)")
    print(f"ratio incl. job start-up : {incl:.2f}x   (median of {len(pairs)} pairs)")
    print(f"ratio excl. start-up     : {excl:.2f}x   (job time minus the one-document job)")
    print("outputs identical (sha256): yes")
    print(f"peak RSS 1x: {peak1 / 2**20:.0f} MiB")
    if args.scale:
        # 4x the corpus in 4x the shards: shards keep their size, as when a corpus grows.
        big = make_corpus(args.docs * args.scale, f"{args.scale}x", shards=8 * args.scale)
        _, _, peak_n = ray_prepare(data_cfg(big, OUT / "ray-big", args.actors), tokenizer)
        print(
            f"peak RSS {args.scale}x: {peak_n / 2**20:.0f} MiB  "
            f"(ratio {peak_n / peak1:.2f}x for {args.scale}x the data, same shard size)"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
