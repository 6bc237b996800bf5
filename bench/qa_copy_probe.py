"""Can the quickstart's model learn in-context QA (copy the answer out of the prompt's facts)?

A plain in-process pretraining loop (no Ray, no DeepSpeed: one process, AdamW, cosine schedule)
over a synthetic corpus's pretraining documents with a Llama of the quickstart's shape, scored
every ``--eval-every`` steps on the corpus's held-out QA prompts asked in the pretraining format
("... Question: ... Answer:"), greedy. It answers the recipe question of the quickstart issue
faster than the full chain: a 300-step variant takes about 100 s on 2 cores.

    raylm synth --out /tmp/corpus && raylm tokenizer train configs/quickstart.yaml --set ...
    python bench/qa_copy_probe.py --corpus runs/quickstart/corpus --tokenizer runs/quickstart/tokenizer
    python bench/qa_copy_probe.py ... --extra-docs easy:5000   # add QA blocks about one person

Prints per evaluation: the training loss, exact matches out of ``--questions`` and how many
answers appear in their prompt at all (a model that copies answers from the prompt; one that
guesses answers of the right kind).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipelines import synth  # noqa: E402


def _easy_doc(rng: random.Random) -> str:
    """3-6 blocks of 1-3 facts about one person, every fact asked about: copying without binding."""
    blocks = []
    for _ in range(synth._between(rng, 3, 6)):
        facts = synth._facts(rng, 1, synth._between(rng, 1, 3))
        lines = ["Facts: " + " ".join(synth._fact_sentence(p, a) for p, a in facts)]
        for person, attr in synth._pick_k(rng, facts, len(facts)):
            question, answer = synth._question(person, attr)
            lines.append(f"Question: {question} Answer: {answer}.")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _recall_doc(rng: random.Random) -> str:
    """Fact blocks repeated in a shuffled order: plain induction (copy what followed before)."""
    blocks = []
    for _ in range(synth._between(rng, 2, 4)):
        facts = synth._facts(rng, synth._between(rng, 1, 3), synth._between(rng, 3, 6))
        sentences = [synth._fact_sentence(p, a) for p, a in facts]
        again = synth._pick_k(rng, sentences, len(sentences))
        blocks.append("Facts: " + " ".join(sentences) + "\nRecall: " + " ".join(again))
    return "\n\n".join(blocks)


EXTRA_KINDS = {"easy": _easy_doc, "recall": _recall_doc}


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="a `raylm synth` output dir")
    ap.add_argument("--tokenizer", required=True, help="a `raylm tokenizer train` output dir")
    ap.add_argument(
        "--extra-docs", default="", help="KIND:N, KIND one of " + ", ".join(EXTRA_KINDS)
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", type=int, default=16, help="rows of --seq-len tokens per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    a = _args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    eos, pad = tok.eos_token_id, tok.pad_token_id or 0
    corpus = Path(a.corpus)
    docs = [json.loads(line)["text"] for f in sorted((corpus / "pretrain").glob("*.jsonl"))
            for line in f.open()]  # fmt: skip
    if a.extra_docs:
        kind, n = a.extra_docs.split(":")
        rng = random.Random(f"qa-probe/{kind}")
        docs += [EXTRA_KINDS[kind](rng) for _ in range(int(n))]
        random.Random(a.seed).shuffle(docs)
    ids: list[int] = []
    for enc in tok(docs)["input_ids"]:
        ids.extend([*enc, eos])
    n_rows = len(ids) // a.seq_len
    data = torch.tensor(ids[: n_rows * a.seq_len]).view(n_rows, a.seq_len)
    held = [json.loads(x) for x in (corpus / "sft" / "heldout" / "qa.jsonl").open()][: a.questions]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.heads,
                      intermediate_size=a.intermediate, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=eos,
                      pad_token_id=pad)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{n_rows} rows of {a.seq_len} tokens; {params:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(
        model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.weight_decay
    )

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        done = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))

    @torch.no_grad()
    def score() -> tuple[int, int]:
        model.eval()
        exact = in_prompt = 0
        for rec in held:
            prompt = rec["messages"][0]["content"]
            x = torch.tensor([tok(prompt + " Answer:")["input_ids"]])
            out = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=pad)
            answer = tok.decode(out[0, x.shape[1] :]).split(".")[0].split("\n")[0].strip()
            exact += answer == rec["reference"]
            in_prompt += bool(answer) and answer in prompt
        model.train()
        return exact, in_prompt

    gen = torch.Generator().manual_seed(a.seed)
    start = time.perf_counter()
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = data[torch.randint(0, n_rows, (a.rows,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            exact, in_prompt = score()
            print(f"step {step + 1}: loss {loss.item():.3f}, QA exact {exact}/{len(held)}, answer in the"
                  f" prompt {in_prompt}/{len(held)}, {time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
