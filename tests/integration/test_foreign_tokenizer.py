"""SFT from a "foreign" HF model whose tokenizer has no chat template and no role tokens.

`data prepare` gives the tokenizer raylm's default template (adding the role and end-of-turn
tokens) and ships that copy with the data; `raylm train` from the smaller-vocabulary base resizes
its embeddings (2 Ray Train workers, ZeRO-2), and the export carries the new vocabulary, the
template and the end-of-turn id among the generation eos ids. LoRA must save the resized
embeddings (`train.lora.modules_to_save`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.config import load_config
from data_pipelines.config import DataConfig
from data_pipelines.pack import IGNORE_INDEX
from data_pipelines.prepare import plan_prepare, summarize
from data_pipelines.tokenize import load_tokenizer
from data_pipelines.tokenizer_train import CHAT_TEMPLATE, END_OF_TURN, ROLE_TOKENS
from tests.conftest import assistant_spans, prepare_sft_data, train_and_export
from training.launcher import plan_job

pytestmark = pytest.mark.timeout(600)
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def _corpus_texts(corpus: Path) -> list[str]:
    texts = []
    for sub in ("pretrain", "sft/train"):
        for shard in sorted((corpus / sub).glob("*.jsonl")):
            texts += [line for line in shard.read_text(encoding="utf-8").splitlines() if line]
    return texts


@pytest.fixture(scope="module")
def foreign_model(synth_corpus, tmp_path_factory) -> Path:
    """Byte-level BPE trained with `tokenizers` alone (only <s> </s> <pad>, no template) and a
    tiny random tied-embedding Llama whose vocabulary is exactly that tokenizer's length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)  # fmt: skip
    core.train_from_iterator(_corpus_texts(synth_corpus), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIALS)
    assert not tok.chat_template and END_OF_TURN not in tok.get_vocab()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)  # fmt: skip
    out = tmp_path_factory.mktemp("foreign_model")
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def foreign_sft(ray_local, synth_corpus, foreign_model, tmp_path_factory):
    return prepare_sft_data(foreign_model, synth_corpus, tmp_path_factory.mktemp("foreign_sft"))


def test_prepare_adds_the_default_template_and_labels_assistant_turns(
    foreign_sft, foreign_model, synth_corpus
) -> None:
    import pyarrow.parquet as pq

    out, m = foreign_sft.output, foreign_sft.manifest
    base = load_tokenizer(foreign_model)
    assert m["tokenizer"]["path"] == str((out / "tokenizer").resolve())
    assert m["tokenizer"]["augmented_from"]["path"] == str(foreign_model.resolve())
    assert m["tokenizer"]["added_tokens"] == [END_OF_TURN, *ROLE_TOKENS]
    tok = load_tokenizer(out / "tokenizer")
    assert tok.chat_template == CHAT_TEMPLATE
    assert len(tok) == len(base) + 4
    for name in SPECIALS:  # its own eos/bos/pad are kept
        assert getattr(tok, f"{name}_id") == getattr(base, f"{name}_id")
    assert "had no chat template" in summarize(foreign_sft)
    end_id = tok.convert_tokens_to_ids(END_OF_TURN)
    assistant_id = tok.convert_tokens_to_ids("<|assistant|>")
    role_ids = {tok.convert_tokens_to_ids(t) for t in ROLE_TOKENS}
    answers = set()
    for f in (synth_corpus / "sft" / "train").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            answers |= {x["content"] for x in json.loads(line)["messages"]
                        if x["role"] == "assistant"}  # fmt: skip
    files = m["splits"]["train"]["files"]
    rows = [r for f in files for r in pq.read_table(out / "train" / f).to_pylist()]
    ids, labels = np.array([r["input_ids"] for r in rows]), np.array([r["labels"] for r in rows])
    carries = labels != IGNORE_INDEX
    assert (labels[carries] == ids[carries]).all()
    assert not np.isin(ids[carries], list(role_ids)).any()
    # exactly the assistant turns carry loss: one span per <|assistant|> marker
    spans = assistant_spans(ids, carries, tok, end_id, answers)
    assert spans == int((ids == assistant_id).sum()) > 0


def test_prepare_rerun_skips_only_with_the_written_tokenizer_intact(
    foreign_sft, foreign_model, synth_corpus, tmp_path
) -> None:
    # The same config as prepare_sft_data: the finished output is recognised without Ray.
    cfg = DataConfig(tokenizer=str(foreign_model), inputs=[str(synth_corpus / "sft" / "train")],
                     output=str(foreign_sft.output), mode="sft", seq_len=128,
                     validation_fraction=0.1, sft={"pack": True})  # fmt: skip
    assert plan_prepare(cfg, str(foreign_model)).existing == foreign_sft.manifest
    copy = tmp_path / "copy"
    shutil.copytree(foreign_sft.output, copy)
    assert plan_prepare(cfg.model_copy(update={"output": str(copy)}), str(foreign_model)).existing
    (copy / "tokenizer" / "tokenizer_config.json").write_text("{}")
    moved = cfg.model_copy(update={"output": str(copy)})
    assert plan_prepare(moved, str(foreign_model)).existing is None


def _train_overrides(foreign_sft, foreign_model, *extra: str) -> list[str]:
    return [
        "train.task=sft",
        f"train.datasets=[{foreign_sft.output}]",
        f"model.init_from={foreign_model}",
        "train.global_batch_tokens=512",  # 4 rows of 128: 2 workers x 2
        "train.micro_batch_size=2",
        "train.max_steps=2",
        "train.lr=0.0001",
        "train.warmup_steps=0",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.eval_batches=1",
        "scaling.num_workers=2",
        "deepspeed.zero_stage=2",
        *extra,
    ]


def _check_export(out: Path, tok_len: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert json.loads((out / "config.json").read_text())["vocab_size"] == tok_len
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.get_input_embeddings().weight.shape[0] == tok_len
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tok) == tok_len and tok.chat_template == CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                     add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert prompt == "<|user|>\nhi<|end|><|assistant|>\n"
    eos = GenerationConfig.from_pretrained(str(out)).eos_token_id
    assert set(eos) == {tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN)}


def test_full_sft_resizes_the_base_embeddings(foreign_sft, foreign_model, tmp_path) -> None:
    from safetensors.torch import load_file

    tok_len = len(load_tokenizer(foreign_sft.output / "tokenizer"))
    cfg = train_and_export("foreign-full", tmp_path / "runs", tmp_path / "export",
                           _train_overrides(foreign_sft, foreign_model))  # fmt: skip
    assert plan_job(cfg).resume_keys["model.vocab_size"] == tok_len
    _check_export(tmp_path / "export", tok_len)
    base = load_file(str(foreign_model / "model.safetensors"))["model.embed_tokens.weight"]
    tuned = load_file(str(tmp_path / "export" / "model.safetensors"))["model.embed_tokens.weight"]
    n = base.shape[0]
    # 2 steps at lr 1e-4 move a weight by ~2e-4: old rows stay the base's, and the new rows
    # start at the mean of the old ones (random rows would be ~0.02 away).
    assert torch.allclose(tuned[:n], base, atol=1e-3)
    assert torch.allclose(tuned[n:], base.mean(0).expand(tok_len - n, -1), atol=1e-3)


def test_lora_saves_the_resized_embeddings_found_through_the_model(
    foreign_sft, foreign_model, tmp_path
) -> None:
    lora = ["train.lora.enabled=true", "train.lora.target_modules=[q_proj,v_proj]"]
    cfg = load_config(None, ["name=foreign-lora", f"train.storage_path={tmp_path}",
                             *_train_overrides(foreign_sft, foreign_model, *lora)])  # fmt: skip
    assert plan_job(cfg).train.lora.modules_to_save == ["embed_tokens"]  # tied: the head follows
    # an untied base needs its output head saved too
    untied = tmp_path / "untied"
    shutil.copytree(foreign_model, untied)
    conf = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**conf, "tie_word_embeddings": False}))
    cfg = load_config(None, ["name=foreign-lora", f"train.storage_path={tmp_path}",
                             *_train_overrides(foreign_sft, untied, *lora)])  # fmt: skip
    job = plan_job(cfg)
    assert job.train.lora.modules_to_save == ["embed_tokens", "lm_head"]
    assert job.resume_keys["train.lora"]["modules_to_save"] == ["embed_tokens", "lm_head"]


def test_lora_with_saved_embeddings_trains_and_exports(
    foreign_sft, foreign_model, tmp_path
) -> None:
    tok_len = len(load_tokenizer(foreign_sft.output / "tokenizer"))
    lora = ["train.lora.enabled=true", "train.lora.target_modules=[q_proj,v_proj]",
            "train.lora.modules_to_save=[embed_tokens]",  # tied: the output head follows
            "scaling.num_workers=1", "train.global_batch_tokens=256"]  # fmt: skip
    train_and_export("foreign-lora", tmp_path / "runs", tmp_path / "export",
                     _train_overrides(foreign_sft, foreign_model, *lora))  # fmt: skip
    _check_export(tmp_path / "export", tok_len)
