"""``raylm export``: a training checkpoint (any ZeRO stage) -> a self-contained Hugging Face dir.

Runs on one CPU process, without the original world size: ZeRO-1/2/3 shards are merged by
DeepSpeed's ``zero_to_fp32`` (pure CPU), ZeRO-0 keeps the whole module in one file. The
checkpoint's integrity manifest is verified first, because both paths unpickle DeepSpeed files.

The output is the trained model's own family (same ``model_type`` and config class, tied or untied
head as trained): ``config.json`` (with ``torch_dtype``), ``model.safetensors`` or shards with
``model.safetensors.index.json`` above ``max_shard_size`` (written by ``save_pretrained``, which
stores a tied head once), the run's tokenizer files with their chat template,
``generation_config.json`` (the base model's when there is one; eos ids include the chat
template's end-of-turn token) and ``provenance.json``.
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

from data_pipelines.chat import end_of_turn_token
from training.checkpoint import (
    HF_CONFIG_NAME,
    STATE_NAME,
    TrainState,
    checkpoint_dirs,
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
    candidates = checkpoint_dirs(root)
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
    """Full fp32 state dict on CPU, from the fp32 master weights of any stage and precision.
    Call only on a verified dir."""
    tag = (ckpt / "latest").read_text(encoding="utf-8").strip()
    # ZeRO 1-3 optimizer files: zero_pp_rank_*, or bf16_zero_pp_rank_* under bf16 (ZeRO-0 in
    # half precision keeps its masters in the model states file instead: below).
    if list((ckpt / tag).glob("*zero_pp_rank_*_optim_states.pt")):
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
    module = dict(states["module"])
    module.update(_zero0_fp32_masters(ckpt, states, module))
    return module


def _zero0_fp32_masters(
    ckpt: Path, states: dict[str, Any], module: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """ZeRO-0 in bf16/fp16: the optimizer's fp32 master copy of each trained parameter, by name.

    The module holds the half-precision weights; DeepSpeed's half-precision optimizer keeps an
    fp32 master per parameter in ``fp32_groups``, one list per parameter group, in the order the
    loop built the groups (``training.loop._param_groups``: matrices, then the 1-D rest, each in
    parameter order). fp32 training keeps no separate master: the module is it (empty result).
    A checkpoint whose groups do not line up with the names is exported from the module, warned.
    """
    groups = (states.get("optimizer") or {}).get("fp32_groups")
    if not groups:
        return {}
    skip = set(states.get("buffer_names") or [])
    names, seen = [], set()
    for n, t in module.items():  # a tied head shares its storage with the embedding: once
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if n not in skip and key not in seen:
            names.append(n)
            seen.add(key)
    by_group = [
        [n for n in names if module[n].dim() >= 2],
        [n for n in names if module[n].dim() < 2],
    ]
    pairs = [(n, t) for g_names, g in zip(by_group, groups, strict=False)
             for n, t in zip(g_names, g, strict=False)]  # fmt: skip
    fits = len(groups) == 2 and [len(g) for g in groups] == [len(g) for g in by_group]
    if not fits or any(tuple(module[n].shape) != tuple(t.shape) for n, t in pairs):
        log.warning("%s: the fp32 master weights do not line up with the parameters; exporting "
                    "the %s module weights", ckpt, next(iter(module.values())).dtype)  # fmt: skip
        return {}
    return {n: t.float() for n, t in pairs}


def _checkpoint_config(ckpt: Path, state: TrainState) -> Any:
    """The trained model's transformers config, as the worker saved it (its own config class)."""
    from transformers import CONFIG_MAPPING

    raw = json.loads((ckpt / HF_CONFIG_NAME).read_text(encoding="utf-8"))
    mtype = raw.get("model_type")
    if mtype in CONFIG_MAPPING:
        return CONFIG_MAPPING[mtype].from_dict(raw)
    base = str(state.resume_keys.get("model.init_from") or "")
    if not state.provenance.get("trust_remote_code") or not base:
        raise CheckpointError(f"{ckpt}: model_type {mtype!r} is unknown to transformers")
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(base, trust_remote_code=True, local_files_only=True)
    return conf.__class__.from_dict(raw)


def _save_model(
    sd: dict[str, torch.Tensor],
    conf: Any,
    dtype: torch.dtype,
    out: Path,
    max_shard_size: str,
    generation: Any,
) -> None:
    """Load ``sd`` into the config's architecture (names and shapes checked) and save it with
    ``save_pretrained``: safetensors, a tied head stored once, shards above ``max_shard_size``."""
    from training.model import meta_model

    model = meta_model(conf)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out_emb is not None and out_emb.weight is in_emb.weight
    kept = {n for n, _ in model.named_parameters()}  # a shared tensor under its first name
    head = next((n for n, p in model.named_parameters(remove_duplicate=False)
                 if tied and p is out_emb.weight and n not in kept), None)  # fmt: skip
    # clone: zero_to_fp32 returns views of one flat buffer, which safetensors refuses to save.
    tensors = {k: v.detach().to(dtype).contiguous().clone() for k, v in sorted(sd.items())}
    if head is not None:
        tensors.pop(head, None)  # the tied duplicate: the input embedding carries it
    expected = {k: v.shape for k, v in model.state_dict().items() if k != head}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(tensors) & set(expected)
                   if tuple(tensors[k].shape) != tuple(expected[k]))  # fmt: skip
    if missing or unexpected or wrong:
        raise CheckpointError(f"checkpoint does not fit its model config: missing {missing}, "
                              f"unexpected {unexpected}, wrong shape {wrong}")  # fmt: skip
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied:
        model.tie_weights()  # assign replaced the shared parameter: share it again
    model.generation_config = generation  # save_pretrained writes it next to the weights
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)


def _tokenizer_source(ckpt: Path, state: TrainState) -> Path:
    """The run dir's copy of the tokenizer, else the path recorded at training time."""
    for cand in (ckpt.parent / "tokenizer", Path(state.provenance.get("tokenizer_path", ""))):
        if str(cand) and (cand / "tokenizer_config.json").is_file():
            return cand
    raise CheckpointError(f"{ckpt}: no tokenizer (looked in {ckpt.parent / 'tokenizer'} and "
                          f"{state.provenance.get('tokenizer_path')!r})")  # fmt: skip


def _write_tokenizer_and_generation(tok_src: Path, out: Path, conf: Any, base: str = "") -> Any:
    """Tokenizer files (with the chat template) and ``generation_config.json``: the base model's
    own when it has one (sampling defaults, stop tokens), its eos ids merged with the tokenizer's
    eos and the chat template's end-of-turn token, so chat replies stop at the end of the turn."""
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(tok_src), local_files_only=True)
    tok.save_pretrained(str(out))  # tokenizer files and the chat template
    if not tok.chat_template:
        log.warning("%s has no chat template; apply_chat_template will fail on the export", tok_src)
    gen = GenerationConfig()
    if base and (Path(base) / "generation_config.json").is_file():
        gen = GenerationConfig.from_pretrained(base, local_files_only=True)
    old = gen.eos_token_id
    eos = list(old) if isinstance(old, list | tuple) else ([] if old is None else [old])
    end = end_of_turn_token(tok)
    for extra in (tok.eos_token_id, tok.convert_tokens_to_ids(end) if end else None):
        if extra is not None and extra not in eos:
            eos.append(extra)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos or None
    gen.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else gen.bos_token_id
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else gen.pad_token_id
    gen.save_pretrained(str(out))
    conf.bos_token_id, conf.pad_token_id = gen.bos_token_id, gen.pad_token_id
    conf.eos_token_id = tok.eos_token_id
    return gen


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

    from training.model import causal_lm_class

    base = str(state.resume_keys.get("model.init_from") or "")
    if not base or not Path(base).is_dir():
        raise CheckpointError(f"{ckpt}: LoRA checkpoint, but its base model dir {base!r} is gone")
    # The base's own vocabulary: training may have grown the embeddings (conf.vocab_size) to a
    # tokenizer with added tokens; the base is grown the same way before the adapter goes on (its
    # modules_to_save tensors already have the new rows).
    base_conf = copy.deepcopy(conf)
    base_conf.vocab_size = json.loads((Path(base) / "config.json").read_text())["vocab_size"]
    remote = bool(state.provenance.get("trust_remote_code"))
    model = causal_lm_class(conf).from_pretrained(
        base, config=base_conf, dtype=torch.float32, use_safetensors=True, local_files_only=True,
        trust_remote_code=remote,
    )  # fmt: skip
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
    max_shard_size: str = "50GB",
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
            return _export(ckpt, state, Path(out), dtype, adapter_only, max_shard_size, origin)
    ckpt, state = find_checkpoint(src)
    return _export(ckpt, state, Path(out), dtype, adapter_only, max_shard_size)


def _export(
    ckpt: Path,
    state: TrainState,
    out: Path,
    dtype: str,
    adapter_only: bool,
    max_shard_size: str,
    origin: str = "",
) -> Path:
    """The export of one verified checkpoint dir (its run's tokenizer next to it or recorded)."""
    if not (ckpt / HF_CONFIG_NAME).is_file():
        raise CheckpointError(f"{ckpt}: no {HF_CONFIG_NAME} (written by raylm train)")
    lora = (ckpt / ADAPTER_CONFIG_NAME).is_file()
    if adapter_only and not lora:
        raise CheckpointError(f"--adapter-only: {ckpt} is not from a LoRA run (train.lora)")
    tmp = _prepare_out(out)
    conf = _checkpoint_config(ckpt, state)
    sd = consolidated_state_dict(ckpt)
    base = str(state.resume_keys.get("model.init_from") or "")
    gen = _write_tokenizer_and_generation(_tokenizer_source(ckpt, state), tmp, conf, base)
    conf.use_cache = True  # training turned the KV cache off; generation wants it
    conf.dtype = _DTYPES[dtype]
    if lora:
        peft_model = _lora_model(ckpt, state, conf, sd)
        if adapter_only:
            _write_adapter(peft_model, tmp, _DTYPES[dtype])
        else:
            sd = peft_model.merge_and_unload().state_dict()
    if not adapter_only:
        _save_model(sd, conf, _DTYPES[dtype], tmp, max_shard_size, gen)
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
