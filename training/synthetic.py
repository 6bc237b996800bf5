"""A small prepared dataset in the ``data prepare`` output contract, without Ray or a corpus.

For tests and benchmarks of the training stage alone: a word-level tokenizer saved as an HF dir,
``train/`` and ``validation/`` parquet shards of packed rows (position_ids restart at 0 per document,
the split's last row padded as its own segment), and ``manifest.json``. Documents follow simple
learnable patterns (arithmetic progressions over the vocabulary) so loss visibly falls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["write_synthetic_dataset", "write_synthetic_preference"]

PAD, EOS = 0, 1


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from data_pipelines.tokenizer_train import CHAT_TEMPLATE, END_OF_TURN

    # The last id is the end-of-turn token, so the chat template (and an export's eos ids)
    # work on this tokenizer too; documents may contain it, which does not matter for training.
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, vocab_size - 1)},
             END_OF_TURN: vocab_size - 1}  # fmt: skip
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=[END_OF_TURN])  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _documents(rng: np.random.Generator, n_docs: int, vocab_size: int) -> list[np.ndarray]:
    docs = []
    for _ in range(n_docs):
        length = int(rng.integers(4, 40))
        start, stride = int(rng.integers(2, vocab_size)), int(rng.integers(1, 4))
        body = 2 + (start - 2 + stride * np.arange(length)) % (vocab_size - 2)
        docs.append(np.append(body, EOS).astype(np.int32))
    return docs


def _pack(docs: list[np.ndarray], seq_len: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Concatenate and cut every seq_len; a cut document continues at position 0 in the next row."""
    ids = np.concatenate(docs)
    doc_start = np.concatenate([np.arange(len(d)) == 0 for d in docs])
    rows_ids, rows_pos = [], []
    for start in range(0, len(ids), seq_len):
        r_ids = ids[start : start + seq_len].copy()
        starts = doc_start[start : start + seq_len].copy()
        starts[0] = True  # a row always starts a segment
        first = np.flatnonzero(starts)  # segment start offsets in the row
        r_pos = (np.arange(len(r_ids)) - first[np.cumsum(starts) - 1]).astype(np.int32)
        if len(r_ids) < seq_len:  # tail: padding as its own segment
            pad = seq_len - len(r_ids)
            r_ids = np.append(r_ids, np.full(pad, PAD, np.int32))
            r_pos = np.append(r_pos, np.arange(pad, dtype=np.int32))
        rows_ids.append(r_ids)
        rows_pos.append(r_pos)
    return rows_ids, rows_pos


def _write_split(
    out: Path, ids: list, pos: list, first_row_id: int, rows_per_file: int
) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k, start in enumerate(range(0, len(ids), rows_per_file)):
        chunk = slice(start, start + rows_per_file)
        n = len(ids[chunk])
        table = pa.table({
            "row_id": pa.array(np.arange(first_row_id + start, first_row_id + start + n), pa.int64()),
            "input_ids": pa.array([r.tolist() for r in ids[chunk]], pa.list_(pa.int32())),
            "position_ids": pa.array([r.tolist() for r in pos[chunk]], pa.list_(pa.int32())),
        })  # fmt: skip
        name = f"part-{k:05d}.parquet"
        pq.write_table(table, out / name)
        files.append(name)
    return files


def write_synthetic_dataset(
    out: str | Path,
    *,
    train_rows: int = 64,
    validation_rows: int = 8,
    seq_len: int = 64,
    vocab_size: int = 64,
    seed: int = 0,
    rows_per_file: int = 16,
) -> Path:
    """Write the dataset (about ``train_rows`` + ``validation_rows`` rows) and return its dir."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(root / "tokenizer", vocab_size)
    rng = np.random.default_rng(seed)
    manifest_splits = {}
    first = 0
    for split, rows in (("train", train_rows), ("validation", validation_rows)):
        docs = _documents(rng, max(1, rows * seq_len // 22), vocab_size)
        ids, pos = _pack(docs, seq_len)
        ids, pos = ids[:rows], pos[:rows]
        files = _write_split(root / split, ids, pos, first, rows_per_file)
        real = int(sum((r != PAD).sum() for r in ids))
        manifest_splits[split] = {"rows": len(ids), "tokens": real, "files": files}
        first += len(ids)
    manifest = {
        "mode": "pretrain",
        "seq_len": seq_len,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "tokens": sum(s["tokens"] for s in manifest_splits.values()),
        "splits": manifest_splits,
        "tokenizer": {"path": str((root / "tokenizer").resolve()), "fingerprint": "synthetic"},
        "config_hash": f"synthetic-{seed}",
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return root


def _pair(rng: np.random.Generator, vocab_size: int, seq_len: int) -> list[np.ndarray]:
    """(chosen ids, chosen labels, rejected ids, rejected labels): a prompt of a progression, the
    chosen answer continuing it, the rejected one a random run; answers end in end-of-turn."""
    eot, span = vocab_size - 1, vocab_size - 3  # ids 2 .. vocab_size - 2
    n_prompt = int(rng.integers(4, max(5, seq_len // 2)))
    start, stride = int(rng.integers(0, span)), int(rng.integers(1, 4))
    prompt = 2 + (start + stride * np.arange(n_prompt)) % span
    n_good, n_bad = (int(rng.integers(2, max(3, seq_len - n_prompt - 1))) for _ in range(2))
    good = 2 + (start + stride * np.arange(n_prompt, n_prompt + n_good)) % span
    bad = rng.integers(2, vocab_size - 1, size=n_bad)
    out = []
    for answer in (good, bad):
        ids = np.concatenate([prompt, answer, [eot]]).astype(np.int32)
        labels = np.where(np.arange(len(ids)) >= n_prompt, ids, -100).astype(np.int32)
        out += [ids, labels]
    return out


def write_synthetic_preference(
    out: str | Path,
    *,
    train_rows: int = 32,
    validation_rows: int = 8,
    seq_len: int = 32,
    vocab_size: int = 64,
    seed: int = 0,
    rows_per_file: int = 16,
) -> Path:
    """A ``data.mode: preference`` output (one unpadded pair per row, sides of different lengths,
    at most ``seq_len`` tokens each) with its tokenizer and manifest; returns its dir."""
    from data_pipelines.writer import PREFERENCE_COLUMNS

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(root / "tokenizer", vocab_size)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, rows in (("train", train_rows), ("validation", validation_rows)):
        pairs = [_pair(rng, vocab_size, seq_len) for _ in range(rows)]
        (root / split).mkdir(parents=True, exist_ok=True)
        files = []
        for k, start in enumerate(range(0, rows, rows_per_file)):
            chunk = pairs[start : start + rows_per_file]
            cols = {"row_id": pa.array(np.arange(start, start + len(chunk)), pa.int64())}
            for c, name in enumerate(PREFERENCE_COLUMNS):
                cols[name] = pa.array([p[c].tolist() for p in chunk], pa.list_(pa.int32()))
            files.append(f"part-{k:05d}.parquet")
            pq.write_table(pa.table(cols), root / split / files[-1])
        tokens = sum(len(p[0]) + len(p[2]) for p in pairs)
        splits[split] = {"rows": rows, "tokens": tokens, "files": files}
    manifest = {
        "mode": "preference", "packed": False, "seq_len": seq_len, "pad_token_id": PAD,
        "eos_token_id": EOS, "tokens": sum(s["tokens"] for s in splits.values()), "splits": splits,
        "tokenizer": {"path": str((root / "tokenizer").resolve()), "fingerprint": "synthetic"},
        "config_hash": f"synthetic-preference-{seed}",
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return root
