"""``raylm export``: a training checkpoint (any ZeRO stage) -> a self-contained Hugging Face dir.

Runs on one CPU process, without the original world size: ZeRO-1/2/3 shards are merged by
DeepSpeed's ``zero_to_fp32`` (pure CPU), ZeRO-0 keeps the whole module in one file. The
checkpoint's integrity manifest is verified first, because both paths unpickle DeepSpeed files.

The output holds ``config.json`` (with ``torch_dtype``), ``model.safetensors`` (a tied output
embedding is stored once), the run's tokenizer files with their chat template,
``generation_config.json`` (eos ids include the end-of-turn token) and ``provenance.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from data_pipelines.tokenizer_train import END_OF_TURN
from training.checkpoint import (
    HF_CONFIG_NAME,
    STATE_NAME,
    TrainState,
    git_commit,
    package_versions,
    verify_checkpoint,
)
from training.errors import CheckpointError
from training.lora import ADAPTER_CONFIG_NAME, load_adapter

__all__ = [
    "PROVENANCE_NAME",
    "consolidated_state_dict",
    "export",
    "find_checkpoint",
]

log = logging.getLogger(__name__)
_ds_log = logging.getLogger("deepspeed.zero_to_fp32")  # DeepSpeed's own output, for the log file
PROVENANCE_NAME = "provenance.json"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_checkpoint(path: str | Path) -> tuple[Path, TrainState]:
    """A checkpoint dir as given, or a run dir's newest checkpoint that verifies.

    Skipped (truncated, partial) checkpoints are named in a warning together with the one used.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such run or checkpoint dir")
    if (root / STATE_NAME).is_file() or (root / "latest").is_file():
        return root, verify_checkpoint(root)
    candidates = sorted((p for p in root.glob("checkpoint_*") if p.is_dir()), reverse=True)
    if not candidates:
        raise CheckpointError(f"{root}: neither a checkpoint nor a run dir with checkpoints")
    skipped: list[str] = []
    for cand in candidates:
        try:
            state = verify_checkpoint(cand)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        if skipped:
            log.warning("exporting %s; skipped: %s", cand, "; ".join(skipped))
        return cand, state
    raise CheckpointError("no intact checkpoint: " + "; ".join(skipped))


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 (or trained-dtype for ZeRO-0) state dict on CPU. Call only on a verified dir."""
    tag = (ckpt / "latest").read_text(encoding="utf-8").strip()
    if list((ckpt / tag).glob("*_optim_states.pt")) and list((ckpt / tag).glob("zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # ZeRO 1-3: the fp32 master partitions of every rank, merged by parameter name. It prints
        # its progress: that goes to the log (the command's log file), not the user's console.
        said = io.StringIO()
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
        _ds_log.info("zero_to_fp32 %s: %s", ckpt, " | ".join(said.getvalue().split("\n")).strip())
        return sd
    # ZeRO-0: the module's state dict as DeepSpeed saved it (weights_only=False: DeepSpeed
    # pickles more than tensors; acceptable because the integrity manifest verified).
    states = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)  # fmt: skip
    return dict(states["module"])


def _model_tensors(
    sd: dict[str, torch.Tensor], conf: Any, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Check names and shapes against the architecture; cast; drop a tied ``lm_head``."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        expected = {k: v.shape for k, v in LlamaForCausalLM(conf).state_dict().items()}
    tied = bool(conf.tie_word_embeddings)
    if tied:
        expected.pop("lm_head.weight", None)
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint does not fit its model config: missing {missing}, "
                              f"unexpected {unexpected}, wrong shape {wrong}")  # fmt: skip
    # clone: zero_to_fp32 returns views of one flat buffer, which safetensors refuses to save.
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in sorted(sd.items())}


def _tokenizer_source(ckpt: Path, state: TrainState) -> Path:
    """The run dir's copy of the tokenizer, else the path recorded at training time."""
    for cand in (ckpt.parent / "tokenizer", Path(state.provenance.get("tokenizer_path", ""))):
        if str(cand) and (cand / "tokenizer_config.json").is_file():
            return cand
    raise CheckpointError(f"{ckpt}: no tokenizer (looked in {ckpt.parent / 'tokenizer'} and "
                          f"{state.provenance.get('tokenizer_path')!r})")  # fmt: skip


def _write_tokenizer_and_generation(tok_src: Path, out: Path, conf: Any) -> dict[str, Any]:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True)
    tok.save_pretrained(str(out))  # tokenizer files and the chat template
    if not tok.chat_template:
        log.warning("%s has no chat template; apply_chat_template will fail on the export", tok_src)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    end = tok.convert_tokens_to_ids(END_OF_TURN) if END_OF_TURN in tok.get_vocab() else None
    if end is not None and end not in eos:
        eos.append(end)  # chat replies stop at the end of the assistant turn
    ids = {"bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
           "eos_token_id": eos[0] if len(eos) == 1 else eos or None}  # fmt: skip
    GenerationConfig(**ids).save_pretrained(str(out))
    conf.bos_token_id, conf.pad_token_id = tok.bos_token_id, tok.pad_token_id
    conf.eos_token_id = tok.eos_token_id
    return ids


def _provenance(ckpt: Path, state: TrainState, dtype: str, origin: str = "") -> dict[str, Any]:
    return {
        "checkpoint": origin or str(ckpt.resolve()),
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "seed": state.provenance.get("seed"),
        "manifest_sha256": state.provenance.get("manifest_sha256", {}),
        "config_hash": state.config_hash,
        "train_versions": state.versions,
        "train_git_commit": state.provenance.get("git_commit", ""),
        "export_versions": package_versions(),
        "export_git_commit": git_commit(),
        "dtype": dtype,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _prepare_out(out: Path) -> Path:
    """A fresh temp dir next to ``out``; refuses to replace a non-empty dir that is no export."""
    if out.exists() and any(out.iterdir()) and not (out / PROVENANCE_NAME).is_file():
        raise FileExistsError(f"{out}: exists and is not a raylm export; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _lora_model(ckpt: Path, state: TrainState, conf: Any, sd: dict[str, torch.Tensor]) -> Any:
    """The run's frozen base (``model.init_from``, safetensors) with the trained adapter on it."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    base = str(state.resume_keys.get("model.init_from") or "")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{ckpt}: LoRA checkpoint, but its base model dir {base!r} is gone")
    # The base's own vocabulary: training may have grown the embeddings (conf.vocab_size) to a
    # tokenizer with added tokens; the base is grown the same way before the adapter goes on (its
    # modules_to_save tensors already have the new rows).
    base_conf = copy.deepcopy(conf)
    base_conf.vocab_size = LlamaConfig.from_pretrained(base).vocab_size
    model = LlamaForCausalLM.from_pretrained(base, config=base_conf, dtype=torch.float32,
                                             use_safetensors=True, local_files_only=True)  # fmt: skip
    if conf.vocab_size > base_conf.vocab_size:
        model.resize_token_embeddings(conf.vocab_size, mean_resizing=False)
    try:
        return load_adapter(model, ckpt, sd)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc


def _write_adapter(peft_model: Any, tmp: Path, dtype: torch.dtype) -> None:
    """adapter_config.json + adapter_model.safetensors (peft's own format, loadable offline)."""
    peft_model.to(dtype)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)


def export(
    src: str | Path,
    out: str | Path,
    dtype: str = "fp32",
    adapter_only: bool = False,
    filesystem: Any = None,
) -> Path:
    """Export ``src`` (run dir or checkpoint dir, local or ``s3://``) to ``out``; returns ``out``.

    A LoRA run exports the base with the adapter merged in, or with ``adapter_only`` the adapter
    alone (``adapter_config.json`` names the base dir), each with the tokenizer files. An S3
    checkpoint is downloaded and verified first (``filesystem``: the run's S3 filesystem; default:
    endpoint and credentials from the environment, ``AWS_ENDPOINT_URL``).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {sorted(_DTYPES)}")
    if str(src).startswith("s3://"):
        from training.storage import fetch_checkpoint, parse_s3, s3_filesystem

        fs = filesystem or s3_filesystem(parse_s3(str(src)))
        with fetch_checkpoint(str(src), fs) as (ckpt, state, origin):
            return _export(ckpt, state, Path(out), dtype, adapter_only, origin)
    ckpt, state = find_checkpoint(src)
    return _export(ckpt, state, Path(out), dtype, adapter_only)


def _export(
    ckpt: Path, state: TrainState, out: Path, dtype: str, adapter_only: bool, origin: str = ""
) -> Path:
    """The export of one verified checkpoint dir (its run's tokenizer next to it or recorded)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if not (ckpt / HF_CONFIG_NAME).is_file():
        raise CheckpointError(f"{ckpt}: no {HF_CONFIG_NAME} (written by raylm train)")
    lora = (ckpt / ADAPTER_CONFIG_NAME).is_file()
    if adapter_only and not lora:
        raise CheckpointError(f"--adapter-only: {ckpt} is not from a LoRA run (train.lora)")
    tmp = _prepare_out(out)
    conf = LlamaConfig.from_json_file(str(ckpt / HF_CONFIG_NAME))
    sd = consolidated_state_dict(ckpt)
    if lora:
        peft_model = _lora_model(ckpt, state, conf, sd)
        if adapter_only:
            _write_adapter(peft_model, tmp, _DTYPES[dtype])
        else:
            sd = peft_model.merge_and_unload().state_dict()
    if not adapter_only:
        tensors = _model_tensors(sd, conf, _DTYPES[dtype])
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer_and_generation(_tokenizer_source(ckpt, state), tmp, conf)
    conf.use_cache = True  # training turned the KV cache off; generation wants it
    conf.dtype = _DTYPES[dtype]
    if not adapter_only:
        conf.save_pretrained(str(tmp))
        _add_torch_dtype(tmp / "config.json")
    prov = _provenance(ckpt, state, dtype, origin)
    if lora:
        prov.update(lora_base=state.resume_keys.get("model.init_from"), adapter_only=adapter_only)
    (tmp / PROVENANCE_NAME).write_text(json.dumps(prov, indent=1), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the export appears complete or not at all
    return out


def _add_torch_dtype(path: Path) -> None:
    """transformers 5 writes ``dtype``; loaders before 4.56 and other tools read ``torch_dtype``."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["torch_dtype"] = raw.get("dtype") or "float32"
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
