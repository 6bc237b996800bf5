"""Config sections owned by the data stage: ``data`` (prepare) and ``tokenizer`` (train)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "DataConfig",
    "DedupConfig",
    "NormalizeConfig",
    "PiiConfig",
    "S3Config",
    "SftColumns",
    "SftConfig",
    "TokenizerConfig",
    "PII_KINDS",
]

PII_KINDS = ("email", "phone", "ip", "card")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class S3Config(_Section):
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (e.g. http://127.0.0.1:9000); unset: AWS default."
    )
    region: str | None = Field(None, description="S3 region; unset: from the environment.")


class NormalizeConfig(_Section):
    unicode: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normal form.")
    collapse_whitespace: bool = Field(
        True, description="Turn runs of spaces/tabs into one space and 3+ newlines into two."
    )


class PiiConfig(_Section):
    enabled: bool = Field(
        False, description="Replace personal data with placeholders like <EMAIL>."
    )
    kinds: list[Literal["email", "phone", "ip", "card"]] = Field(
        default_factory=lambda: list(PII_KINDS), description="Which kinds to redact."
    )


class DedupConfig(_Section):
    enabled: bool = Field(
        True, description="Drop exact duplicates (after normalization) across shards."
    )
    partitions: int = Field(
        2,
        ge=1,
        le=256,
        description="Hash-partitioned dedup actors, each holding one 8-byte key per kept document.",
    )


Role = Literal["system", "user", "assistant", "tool"]


class SftColumns(_Section):
    """Where chat and preference records keep each part, when not under the standard names."""

    messages: str | None = Field(
        None, description="OpenAI-style message list; unset: `data.messages_field`."
    )
    conversations: str = Field("conversations", description="ShareGPT turn list.")
    role_key: str | None = Field(
        None, description="Key of a turn's role; unset: `role` (messages), `from` (ShareGPT)."
    )
    content_key: str | None = Field(
        None, description="Key of a turn's text; unset: `content` (messages), `value` (ShareGPT)."
    )
    roles: dict[str, Role] = Field(
        default_factory=dict,
        description="More role tags, e.g. {bot: assistant}; known: human, user, gpt, assistant, "
        "system, tool.",
    )
    system: str = Field("system", description="System prompt (Alpaca, ShareGPT).")
    instruction: str = Field("instruction", description="Alpaca instruction.")
    input: str = Field("input", description="Alpaca input, joined to the instruction by a newline.")
    output: str = Field("output", description="Alpaca answer.")
    history: str = Field("history", description="Alpaca earlier [user, assistant] pairs.")
    prompt: str = Field("prompt", description="Prompt: a string or a message list.")
    completion: str = Field("completion", description="Answer to `prompt` (sft).")
    chosen: str = Field(
        "chosen", description="Preferred answer or whole conversation (preference)."
    )
    rejected: str = Field("rejected", description="Other answer or conversation (preference).")


class SftConfig(_Section):
    pack: bool = Field(False, description="Pack several conversations per row (positions reset).")
    overlong: Literal["truncate", "drop"] = Field(
        "drop",
        description="What to do with a conversation (or preference pair) longer than seq_len.",
    )
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = Field(
        "auto",
        description="Chat record format; auto: per record from its fields (messages, "
        "conversations, instruction/output, prompt/completion; else unknown_format).",
    )
    columns: SftColumns = Field(default_factory=SftColumns)
    system_fallback: Literal["reject", "prepend"] = Field(
        "reject",
        description="A system message on a chat template without a system role (Gemma, Mistral "
        "v0.3): reject the record (system_not_supported) or prepend it to the first user turn.",
    )


class DataConfig(_Section):
    """``raylm data prepare``: corpora -> cleaned, deduplicated, tokenized, packed parquet."""

    inputs: list[str] = Field(
        default_factory=list,
        description="Files, directories, globs or s3:// URIs of jsonl, jsonl.gz, parquet, arrow or "
        "text shards; local Hugging Face datasets (save_to_disk dirs, hub cache snapshots).",
    )
    hf_split: str = Field(
        "train", description="Split read from a Hugging Face dataset dir that holds several."
    )
    format: Literal["auto", "jsonl", "parquet", "arrow", "text"] = Field(
        "auto", description="Input format; auto: from the file extension."
    )
    text_field: str = Field("text", description="Record field holding the document text.")
    messages_field: str = Field("messages", description="Record field holding chat messages (sft).")
    text_unit: Literal["file", "line"] = Field(
        "file", description="Plain-text inputs: one document per file or per non-empty line."
    )
    mode: Literal["pretrain", "sft", "preference"] = Field(
        "pretrain",
        description="pretrain: pack documents with EOS; sft: chat template + loss labels; "
        "preference: prompt + chosen/rejected answers, one pair per row.",
    )
    output: str = Field("runs/data", description="Output directory (local path).")
    tokenizer: str = Field(
        "", description="HF tokenizer directory; empty: the `tokenizer.output` of this config."
    )
    seq_len: int = Field(512, ge=8, le=1_048_576, description="Tokens per packed row.")
    min_chars: int = Field(
        1, ge=0, description="Documents shorter than this are rejected (too_short)."
    )
    max_chars: int = Field(
        1_000_000, ge=1, description="Documents longer than this are rejected (too_long)."
    )
    validation_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of documents (by content hash) in validation."
    )
    strict: bool = Field(False, description="Stop at the first bad record, naming file:line.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    s3: S3Config = Field(default_factory=S3Config)
    rows_per_file: int = Field(2048, ge=1, description="Rows per output parquet file.")
    arrow_copy: bool = Field(
        True,
        description="Also write each parquet file as an uncompressed Arrow IPC file "
        "(`part-NNNNN.arrow`), from which training reads each wanted row's bytes alone instead of "
        "decoding its parquet row group: 25-50x the rows/s, for about twice the disk (the parquet "
        "is zstd). Without it, training reads the parquet row groups.",
    )
    num_actors: int = Field(
        2, ge=1, description="Actors that parse, clean, dedup and tokenize shards (one shard each)."
    )
    actor_cpus: float = Field(
        1.0,
        gt=0,
        description="Logical CPUs per processing actor; keep the pool below the CPUs Ray has, "
        "or read tasks starve.",
    )
    actor_restarts: int = Field(
        0,
        ge=-1,
        description="Restarts of a processing actor that died (-1: unlimited), its shard retried; "
        "0: a dead actor fails the job (a re-run rebuilds). Ray 2.60 prints a warning line per "
        "actor on the console when this is not 0 (ray#53727).",
    )
    batch_size: int = Field(512, ge=1, description="Documents per tokenize call and output chunk.")
    object_store_mb: int | None = Field(
        512,
        ge=64,
        description="Cap on object-store memory for this job's in-flight blocks, in MB; keeps "
        "memory flat as the corpus grows. None: Ray Data's default budget.",
    )
    block_size_mb: int | None = Field(
        16,
        ge=1,
        description="Ray Data target block size in MB; small blocks stream to the packer sooner "
        "and bound worker memory. None: Ray's default (128).",
    )

    @model_validator(mode="after")
    def _check_lengths(self) -> DataConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) is above max_chars ({self.max_chars})")
        return self


class TokenizerConfig(_Section):
    """``raylm tokenizer train``: byte-level BPE on a sample of the corpus."""

    inputs: list[str] = Field(
        default_factory=list, description="Corpus to sample; empty: `data.inputs`."
    )
    output: str = Field(
        "runs/tokenizer", description="Where the HF tokenizer directory is written."
    )
    vocab_size: int = Field(
        4096, ge=300, le=1_000_000, description="Vocabulary size incl. specials."
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a merge.")
    max_docs: int = Field(50_000, ge=1, description="Documents sampled for training.")
    sample_fraction: float = Field(
        1.0, gt=0.0, le=1.0, description="Share of documents kept by content hash before max_docs."
    )
    model_max_length: int = Field(2048, ge=8, description="Recorded as the tokenizer's max length.")
