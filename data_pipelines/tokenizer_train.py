"""``raylm tokenizer train``: byte-level BPE on a sample of the corpus read through Ray Data.

The result is a plain Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained`` loads it
offline) with bos/eos/pad, chat-role special tokens, an end-of-turn token and a chat template.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipelines.clean import content_hash, normalize_text
from data_pipelines.config import DataConfig, TokenizerConfig
from data_pipelines.formats import RecordFields
from data_pipelines.readers import expand_inputs, parse_file

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_tokenizer", "train_tokenizer"]

log = logging.getLogger("raylm.tokenizer")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, END_OF_TURN, *ROLE_TOKENS]

# Each turn: role marker, newline, content, end-of-turn. The assistant's content and <|end|> carry the
# SFT loss; generation stops at <|end|>. No newline after <|end|>, so nothing outside a turn is learned.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _sample_texts(batch: dict[str, np.ndarray], data: DataConfig, display: dict, fraction: float):
    """Ray Data batch function over shards: normalized texts kept by a hash-based sample."""
    texts = []
    fields = RecordFields.from_config(data.model_copy(update={"mode": "pretrain"}))
    for path, blob in zip(batch["path"], batch["bytes"], strict=True):
        name = display.get(path) or display.get("/" + path) or str(path)
        for rec in parse_file(
            name, blob, data.format, fields, data.text_unit, messages_as_text=True
        ):
            if rec.reason:
                continue
            text = normalize_text(rec.payload, data.normalize.unicode)
            digest = content_hash(text)
            if text and int.from_bytes(digest[:8], "big") < fraction * 2**64:
                texts.append(text)
    return {"text": np.asarray(texts, dtype=object)}


def build_tokenizer(texts: Iterator[str], vocab_size: int, min_frequency: int, max_length: int):
    """Train byte-level BPE and wrap it as a transformers fast tokenizer with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TURN, *ROLE_TOKENS],
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def train_tokenizer(tcfg: TokenizerConfig, data: DataConfig, progress: bool = True) -> Path:
    """Sample the corpus through Ray Data, train, save. Returns the tokenizer directory."""
    import ray
    from tqdm import tqdm

    from data_pipelines.prepare import _scoped_data_context

    specs = tcfg.inputs or data.inputs
    files = expand_inputs(specs, data.format, data.s3.endpoint_url, data.s3.region, data.hf_split)
    with _scoped_data_context(data):
        ds = ray.data.read_binary_files(
            files.paths, include_paths=True, filesystem=files.filesystem
        ).map_batches(
            _sample_texts,
            fn_kwargs={"data": data, "display": files.display, "fraction": tcfg.sample_fraction},
            batch_size=1,
        )
        bar = tqdm(total=tcfg.max_docs, desc="tokenizer sample", unit="doc", disable=not progress)
        texts: list[str] = []
        for row in ds.iter_rows():
            texts.append(row["text"])
            bar.update(1)
            if len(texts) >= tcfg.max_docs:
                break
        bar.close()
    if not texts:
        from data_pipelines.errors import DataError

        raise DataError(f"tokenizer.inputs: no usable documents in {specs}")
    log.info("training BPE (vocab %d) on %d documents", tcfg.vocab_size, len(texts))
    tok = build_tokenizer(iter(texts), tcfg.vocab_size, tcfg.min_frequency, tcfg.model_max_length)
    out = Path(tcfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out
