"""The per-worker training loop: setup -> step -> maybe log -> maybe checkpoint -> maybe eval -> cleanup.

Ray-free on purpose: rank, world size, the data, reporting and where to resume from come in as
arguments (:class:`WorkerIO`), so the same loop runs under Ray Train (``training.launcher``) and as a
single process (a GPU benchmark). Collectives are marked; every rank runs the same number of steps,
evals and reports, or the others hang.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from training.batch import IGNORE_INDEX, forward_packed, loss_targets, token_loss
from training.checkpoint import (
    HF_CONFIG_NAME,
    TrainState,
    checkpoint_name,
    load_rng,
    resume_mismatch,
    save_rng,
    verify_checkpoint,
    write_integrity,
    write_state,
)
from training.config import DeepSpeedConfig, ModelConfig, TrainConfig
from training.data import DatasetInfo, MixedRows, validation_batches
from training.dpo import PairScores, collate_pairs, pair_scores, reference_logps
from training.ds_config import build_ds_config
from training.errors import CheckpointError, NonFiniteError
from training.lora import apply_lora
from training.model import (
    build_model,
    causal_lm_class,
    flops_per_token,
    hf_config,
    init_parameter,
    resize_vocab,
)
from training.observe import close_trackers, log_row
from training.preempt import stop_flags, stop_reason
from training.records import (
    METRICS_NAME,
    append_event,
    append_row_ids,
    local_param_counts,
    trim_jsonl,
    trim_row_ids,
    write_worker_info,
)

__all__ = ["METRICS_NAME", "Reporter", "WorkerHooks", "WorkerIO", "WorkerJob", "run_worker"]

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class WorkerJob:
    """Everything a worker needs, resolved on the driver (plain data: it travels to Ray workers)."""

    model: ModelConfig
    train: TrainConfig
    deepspeed: DeepSpeedConfig
    seed: int
    run_dir: str
    datasets: list[DatasetInfo]
    weights: list[float]
    seq_len: int
    vocab_size: int
    pad_id: int
    total_steps: int
    config_hash: str
    resume_keys: dict[str, Any] = field(default_factory=dict)
    use_gpu: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    # seed, dataset manifest hashes, tokenizer path, git commit: copied into every checkpoint.
    provenance: dict[str, Any] = field(default_factory=dict)
    # Audit trail: each rank appends the row ids of every step to row_ids/rank_R.jsonl.
    record_row_ids: bool = False
    # DPO with a precomputed reference: per dataset, the dir of its reference log-probs
    # (training.reference); empty otherwise.
    reference: list[str] = field(default_factory=list)


class Reporter(Protocol):
    def __call__(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: Path | None,
        step: int,
        dir_name: str | None = None,
    ) -> None:
        """Called by every rank the same number of times (a collective under Ray Train); with a
        checkpoint, ``dir_name`` is what to store it as (the same on every rank)."""


@dataclass
class WorkerHooks:
    """Callables a caller hands into every worker's loop (tests: fault injection, gradient capture).

    They travel to Ray workers by cloudpickle inside ``train_loop_config``, so a test passes its own
    functions; nothing in raylm sets them.
    """

    # Called after each optimizer step with (step, rank).
    after_step: Callable[[int, int], None] | None = None
    # Called with (module, step, rank) after the step's last backward, before the optimizer update:
    # under ZeRO-0 the module's .grad holds the reduced gradient.
    before_update: Callable[[torch.nn.Module, int, int], None] | None = None


@dataclass
class WorkerIO:
    rank: int
    world_size: int
    report: Reporter
    # Checkpoint dirs to try, newest first; the first one that verifies is resumed from. May be
    # a lazy iterable (S3: each is downloaded only when reached).
    resume_candidates: Callable[[], Iterable[Path]] = list
    # What a candidate is called in errors, warnings and events.jsonl (S3: its s3:// URI, not the
    # temporary download).
    name_of: Callable[[Path], str] = str
    # WorkerHooks.after_step and .before_update (see there); None unless a caller hands them in.
    after_step: Callable[[int, int], None] | None = None
    before_update: Callable[[torch.nn.Module, int, int], None] | None = None
    # Write checkpoints in place as <checkpoint_root>/<checkpoint name> (the run dir on a filesystem
    # every rank sees; the reporter then registers the dir without copying it). None: each rank
    # writes to a local temporary dir and the reporter copies it into storage.
    checkpoint_root: Path | None = None
    # The reporter owns a reported temporary checkpoint dir and deletes it once it is stored (Ray's
    # asynchronous upload); otherwise the loop deletes it when the report returns.
    reporter_deletes_checkpoints: bool = False


@dataclass
class _Ctx:
    job: WorkerJob
    io: WorkerIO
    engine: Any
    data: MixedRows
    eval_data: list[dict[str, np.ndarray]]
    state: TrainState
    dtype: torch.dtype
    flops_per_token: float
    last_log: tuple[float, int] = (0.0, 0)  # (time, step) of the previous metrics row
    loss_acc: torch.Tensor | None = None  # this rank's share of step losses since the last log
    steps_acc: int = 0  # steps since the last log
    step_lr: float = 0.0  # lr the last optimizer step ran at
    grad_norm: float | None = None  # pre-clip global grad norm of the last step
    log_tokens: int = 0  # state.tokens_seen at the previous metrics row
    # DPO: this rank's shares of (dpo loss, chosen reward, rejected reward, reward accuracy,
    # chosen NLL) summed over the steps since the last log; (5,) float64.
    dpo_acc: torch.Tensor | None = None
    stop: str | None = None  # why the run must stop after this step (the step's flags), or None


# ---------------------------------------------------------------- setup


def prefer_interpreter_ninja(env: MutableMapping[str, str], bindir: Path) -> bool:
    """Put ``bindir`` (the interpreter's own bin dir) first on ``env``'s PATH when it holds a
    ``ninja``; True when PATH changed.

    DeepSpeed JIT-builds its CPU ops (CPU Adam for optimizer offload) under
    ``~/.cache/torch_extensions`` with whichever ``ninja`` PATH finds first. The ``ninja`` that pip
    installs next to the interpreter (1.13) and a system one (1.11) keep incompatible build logs,
    so a run from an activated venv after one that was not (or under the multi-node tests' PATH)
    rebuilt every op: about 40 s per rank and stage, every time. One choice for every process.
    """
    if not (bindir / "ninja").is_file():
        return False
    path = env.get("PATH", "")
    if path.split(os.pathsep)[0] == str(bindir):
        return False
    env["PATH"] = os.pathsep.join([str(bindir), path]) if path else str(bindir)
    return True


def skip_cpu_shm_op() -> None:
    """Keep DeepSpeed from building its CPU shared-memory collectives (``deepspeed_shm_comm``).

    ``deepspeed.init_distributed`` JIT-builds and loads that op on the CPU accelerator, but only
    ``inference_all_reduce`` (tensor-parallel inference) uses it; training's all-reduce, reduce-
    scatter and all-gather go through the torch process group (gloo) either way. Its build took
    25-30 s on the first run on a machine or venv (the compile command names the venv), with
    every rank waiting on it. ``deepspeed.ops.__compatible_ops__`` is the dict ``build_shm_op``
    consults; DeepSpeed keeps one per process so that edits to it persist.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def compile_on_first_call(compile_fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for ``torch.compile`` (both forms: ``(fn, **kw)`` and ``(**kw)(fn)``) that calls
    ``compile_fn(fn, **kw)`` on the wrapped function's first call instead of at decoration."""

    def deferred(model: Any = None, **kwargs: Any) -> Any:
        if model is None:
            return lambda fn: deferred(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args: Any, **kw: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = compile_fn(model, **kwargs)
            return compiled(*args, **kw)

        return call

    return deferred


def import_muon_uncompiled() -> bool:
    """Import DeepSpeed's Muon optimizer module with its ``torch.compile`` decorations deferred to
    each function's first call; True when this call imported it.

    ``deepspeed.initialize`` imports that module whatever the optimizer (ZeRO's supported-optimizer
    check, and the ZeRO optimizers' ``isinstance`` tests), and the module applies ``torch.compile``
    to three functions at import, which imports ``torch._inductor``: 2.6 s of CPU in every worker
    of every run, measured on 2 cores, for an optimizer raylm never builds (AdamW; see
    ``ds_config``). Deferred, the functions compile as before if one is ever called.
    """
    if MUON_MODULE in sys.modules:
        return False
    import importlib

    real = torch.compile
    torch.compile = compile_on_first_call(real)  # type: ignore[assignment]
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        torch.compile = real
    return True


def _init_distributed(use_gpu: bool, world_size: int) -> None:
    import deepspeed

    prefer_interpreter_ninja(os.environ, Path(sys.executable).parent)  # before any op builds
    if not use_gpu:
        skip_cpu_shm_op()

    # Under Ray Train the torch process group already exists; deepspeed.init_distributed then
    # only wraps it. It must still run: zero.Init reads the world size from deepspeed.comm.
    if not dist.is_initialized() and world_size == 1:  # single process without a launcher
        if "MASTER_PORT" not in os.environ:  # a free port: other single-process runs may be up
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                           ("WORLD_SIZE", "1")):  # fmt: skip
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; norms (1-D) are not decayed. ZeRO-3 params keep their shape in ds_shape."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _build_engine(job: WorkerJob, io: WorkerIO, dtype: torch.dtype) -> Any:
    import deepspeed

    import_muon_uncompiled()  # before deepspeed.initialize imports it, compiling
    ds_conf = build_ds_config(job.train, job.deepspeed, seq_len=job.seq_len,
                              world_size=io.world_size, total_steps=job.total_steps,
                              use_gpu=job.use_gpu, cuda_available=torch.cuda.is_available())  # fmt: skip
    zero3 = job.deepspeed.zero_stage == 3
    ckpt = job.train.activation_checkpointing
    hf_ds = None
    if zero3 and job.model.init_from:
        # from_pretrained sees this (kept alive in hf_ds) and loads straight into partitions.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_conf)  # noqa: F841
        model = build_model(job.model, job.vocab_size, dtype, ckpt)
    elif zero3:
        # Import the family's modelling module first: importing it (and torch._dynamo with it)
        # while zero.Init patches the tensor constructors fails.
        causal_lm_class(hf_config(job.model, job.vocab_size, dtype))
        # collective: zero.Init partitions each parameter as it is created, so no rank ever
        # holds the full model; weights are then initialised one gathered parameter at a time.
        with deepspeed.zero.Init(config_dict_or_path=ds_conf):
            model = build_model(job.model, job.vocab_size, dtype, ckpt, seed=None)
        _zero3_init_weights(model, job.seed, job.model.init_std)
    else:
        model = build_model(job.model, job.vocab_size, dtype, ckpt, seed=job.seed)
    if job.model.init_from:
        # The dataset tokenizer outgrew the base (e.g. the default chat template's tokens): grow
        # embed_tokens and an untied lm_head; the config's vocab_size follows, so checkpoints and
        # exports get the new shapes. Under ZeRO-3 (hf_ds alive) transformers gathers the
        # partitioned weights; deepspeed.initialize partitions the new ones.
        resize_vocab(model, job.vocab_size, job.seed)
    if job.train.lora.enabled:
        # peft draws lora_A from torch's global generator, whose seed differs per process: from
        # the run's seed instead, so two runs of one config start from the same adapters.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.seed)
            model = apply_lora(model, job.train.lora, ckpt)
    # Right after construction: what this rank holds (ZeRO-3: about total / world).
    local, total = local_param_counts(model)
    write_worker_info(Path(job.run_dir), io.rank, {"rank": io.rank, "world_size": io.world_size,
                      "zero_stage": job.deepspeed.zero_stage, "local_params": local,
                      "total_params": total})  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=_param_groups(model, job.train.weight_decay), config=ds_conf
    )
    return engine


def _zero3_init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Same weights as a whole-model init: gather one parameter (all ranks), rank 0 fills it,
    the context exit re-partitions and broadcasts. Peak extra memory: the largest parameter."""
    import deepspeed

    for name, param in model.named_parameters():
        # collective: every rank gathers the same parameter in the same order.
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if dist.get_rank() == 0:
                init_parameter(name, param, seed, std)


def _setup(job: WorkerJob, io: WorkerIO) -> _Ctx:
    _init_distributed(job.use_gpu, io.world_size)
    dtype = _DTYPES[job.deepspeed.precision]
    engine = _build_engine(job, io, dtype)
    from training.ds_config import batch_plan

    plan = batch_plan(job.train.global_batch_tokens, job.seq_len, job.train.micro_batch_size,
                      io.world_size)  # fmt: skip
    refs = job.reference or None  # DPO: precomputed reference log-probs join the rows
    data = MixedRows(job.datasets, job.weights, job.seed, plan.global_rows, plan.micro_batch,
                     io.world_size, io.rank, references=refs)  # fmt: skip
    eval_data = validation_batches(job.datasets, plan.micro_batch, io.world_size, io.rank,
                                   job.train.eval_batches, references=refs)  # fmt: skip
    state = TrainState(world_size=io.world_size, config_hash=job.config_hash,
                       resume_keys=job.resume_keys, versions=job.versions,
                       provenance=job.provenance)  # fmt: skip
    ctx = _Ctx(job, io, engine, data, eval_data, state, dtype,
               flops_per_token(engine.module.config, job.seq_len))  # fmt: skip
    if not _maybe_resume(ctx):
        # Fresh run: advance DeepSpeed's scheduler from its pre-start state so step 1 runs at
        # warmup ratio 0/warmup (then 1/warmup, ...); a resume restores the scheduler instead.
        engine.lr_scheduler.step()
    # After a resume, records of steps beyond the checkpoint describe discarded work.
    trim_row_ids(Path(job.run_dir), io.rank, ctx.state.step)
    if io.rank == 0:
        trim_jsonl(Path(job.run_dir) / METRICS_NAME, ctx.state.step)
        _copy_tokenizer(job)
    ctx.last_log = (time.perf_counter(), ctx.state.step)
    ctx.log_tokens = ctx.state.tokens_seen
    return ctx


def _maybe_resume(ctx: _Ctx) -> bool:
    """Load the newest checkpoint that verifies (True), warning naming any skipped one."""
    skipped: list[str] = []
    for cand in ctx.io.resume_candidates():
        name = ctx.io.name_of(cand)
        try:
            saved = verify_checkpoint(cand)
        except CheckpointError as exc:
            skipped.append(str(exc).replace(str(cand), name))
            continue
        diff = resume_mismatch(saved.resume_keys, ctx.job.resume_keys)
        if diff:
            raise CheckpointError(f"{name}: cannot resume, changed: {', '.join(diff)}")
        # collective: every rank loads its own shards (same dir, rank-specific file names).
        # LoRA checkpoints hold only the adapters; the frozen base came from model.init_from.
        path, _ = ctx.engine.load_checkpoint(str(cand), load_optimizer_states=True,
                                             load_lr_scheduler_states=True,
                                             load_module_strict=not ctx.job.train.lora.enabled)  # fmt: skip
        if path is None:
            raise CheckpointError(f"{cand}: DeepSpeed found no engine state")
        load_rng(Path(cand), ctx.io.rank)
        ctx.state = saved
        if skipped:  # the skipped checkpoints' steps are trained again: name them apart
            ctx.state.lineage = f"_from{saved.step:08d}"
        if ctx.io.rank == 0:
            _note_resume(ctx, name, skipped)
        return True
    if skipped:
        raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(skipped))
    return False


def _note_resume(ctx: _Ctx, name: str, skipped: list[str]) -> None:
    if skipped:
        log.warning("resuming from %s; skipped: %s", name, "; ".join(skipped))
    append_event(Path(ctx.job.run_dir), "resume", step=ctx.state.step, checkpoint=name,
                 skipped=skipped)  # fmt: skip


def _copy_tokenizer(job: WorkerJob) -> None:
    """Rank 0, once per run: the run dir keeps its tokenizer, so export needs nothing else."""
    src, dst = Path(job.datasets[0].tokenizer_path), Path(job.run_dir) / "tokenizer"
    if dst.is_dir() or not src.is_dir():
        return
    tmp = dst.with_name(f".tokenizer.{os.getpid()}")
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    tmp.rename(dst)  # atomic: a killed copy never looks complete


# ---------------------------------------------------------------- step


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.asarray(v)).long().to(device) for k, v in batch.items()}


def _targets(ctx: _Ctx, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """(mb, seq-1) next-token targets with IGNORE_INDEX where no loss (SFT: labels == -100)."""
    labels = t.get("labels") if ctx.job.train.task == "sft" else None
    return loss_targets(t["input_ids"], t["position_ids"], ctx.job.pad_id, labels)


def _on_device(
    ctx: _Ctx, batch: dict[str, np.ndarray]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The micro-batch's tensors on the engine's device and its (mb, seq-1) loss targets."""
    t = _to_device(batch, ctx.engine.device)
    return t, _targets(ctx, t)


def _forward_loss(
    ctx: _Ctx, t: dict[str, torch.Tensor], targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, loss-token count) of one micro-batch; input_ids/position_ids (mb, seq)."""
    return token_loss(forward_packed(ctx.engine, t["input_ids"], t["position_ids"]), targets)


def _global_loss_tokens(targets: list[torch.Tensor]) -> torch.Tensor:
    """Loss-bearing tokens of the whole optimizer step, over all ranks and micro-batches.

    collective: one all_reduce per step. Known before any forward, from the targets alone.
    """
    count = torch.stack([(t != IGNORE_INDEX).sum() for t in targets]).sum()
    dist.all_reduce(count)
    return count


def _train_step(ctx: _Ctx, micro_batches: list[dict[str, np.ndarray]]) -> None:
    """One optimizer step over this rank's micro-batches.

    The loss is the sum over every loss token of the step divided by the step's global count of
    loss tokens (all ranks, all micro-batches), not a mean of per-micro-batch means: with SFT masks
    the counts differ per micro-batch, and a mean of means would make the gradient depend on how
    the batch is split over ranks and accumulation steps. DeepSpeed divides the backward loss by
    grad_accum and averages gradients over ranks, so each micro-batch's sum is scaled by
    grad_accum x world / global_count first.
    """
    engine = ctx.engine
    skipped_before = engine.skipped_steps
    ctx.step_lr = float(engine.get_lr()[0])
    prepared = [_on_device(ctx, mb) for mb in micro_batches]
    n_global = _global_loss_tokens([targets for _, targets in prepared])
    scale = len(micro_batches) * ctx.io.world_size / n_global.clamp(min=1).double()
    step_loss = torch.zeros((), device=engine.device)  # this rank's share of the step's mean
    for k, (t, targets) in enumerate(prepared):
        total, _count = _forward_loss(ctx, t, targets)
        _backward(ctx, total * scale.to(total.dtype), last=k == len(micro_batches) - 1)
        step_loss += total.detach() / n_global.clamp(min=1)
    _finish_step(ctx, step_loss, skipped_before, micro_batches,
                 ctx.data.global_rows * ctx.job.seq_len, n_global)  # fmt: skip


def _backward(ctx: _Ctx, loss: torch.Tensor, last: bool) -> None:
    """One micro-batch's backward, then DeepSpeed's step (an optimizer update only when ``last``:
    the accumulation boundary)."""
    engine = ctx.engine
    engine.backward(loss)  # collective at the boundary (reduce)
    if last and ctx.io.before_update is not None:
        ctx.io.before_update(engine.module, ctx.state.step + 1, ctx.io.rank)
    if last and ctx.job.deepspeed.zero_stage == 0:
        ctx.grad_norm = _local_grad_norm(engine.module)  # reduced, not yet clipped
    engine.step()  # optimizer step only at the boundary


def _finish_step(
    ctx: _Ctx,
    step_loss: torch.Tensor,
    skipped_before: int,
    micro_batches: list[dict[str, np.ndarray]],
    tokens: int,
    loss_tokens: torch.Tensor,
) -> None:
    """After the update: grad norm, the train state, the caller's after_step hook, then the step's
    one collective of flags (non-finite loss per rank, stop requests) and what follows from it."""
    if ctx.job.deepspeed.zero_stage > 0:
        norm = ctx.engine.get_global_grad_norm()  # computed inside ZeRO's step, same on every rank
        ctx.grad_norm = None if norm is None else float(norm)
    ctx.state.step += 1
    if ctx.job.record_row_ids:
        append_row_ids(Path(ctx.job.run_dir), ctx.io.rank, ctx.state.step, micro_batches)
    ctx.state.tokens_seen += tokens
    ctx.state.loss_tokens_seen += int(loss_tokens)  # host sync; cheap next to a step
    ctx.state.epoch, ctx.state.step_in_epoch = divmod(ctx.state.step, ctx.data.steps_per_epoch)
    if ctx.io.after_step is not None:
        ctx.io.after_step(ctx.state.step, ctx.io.rank)
    bad_ranks, ctx.stop = _step_flags(ctx, step_loss)
    _health_check(ctx, bad_ranks, skipped_before)
    ctx.loss_acc = step_loss if ctx.loss_acc is None else ctx.loss_acc + step_loss
    ctx.steps_acc += 1  # steps since the last log


# ---------------------------------------------------------------- DPO step


def _pairs_on_device(ctx: _Ctx, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A micro-batch of preference rows collated (chosen sides first, ``training.dpo``) on the
    engine's device, with its host-side token counts."""
    cols = collate_pairs(batch, ctx.job.pad_id)
    dev = ctx.engine.device
    t: dict[str, Any] = {k: torch.from_numpy(v).to(dev) for k, v in cols.items()}
    answer = cols["labels"][:, 1:] != IGNORE_INDEX  # (2 x pairs, L-1)
    pairs = len(answer) // 2
    t["counts"] = (int(answer[:pairs].sum()), int(answer.sum()),
                   int(sum(len(x) for c in ("chosen_input_ids", "rejected_input_ids")
                           for x in batch[c])))  # fmt: skip
    return t


def _pair_scores(ctx: _Ctx, t: dict[str, Any]) -> PairScores:
    """The policy's scores of a collated micro-batch against its reference: precomputed
    log-probs from the rows, or (LoRA) the same engine with the adapter switched off."""
    dpo = ctx.job.train.dpo
    if dpo.reference == "adapter_disabled":
        with ctx.engine.module.disable_adapter():  # torchtune's LoRA DPO recipe does the same
            ref = reference_logps(ctx.engine, t)
    else:
        ref = (t["ref_chosen_logp"], t["ref_rejected_logp"])
    return pair_scores(ctx.engine, t, ref, dpo.beta, dpo.loss, dpo.label_smoothing)


def _dpo_step(ctx: _Ctx, micro_batches: list[dict[str, np.ndarray]]) -> None:
    """One optimizer step of DPO over this rank's micro-batches of pairs.

    The objective is the mean DPO loss over the step's pairs (all ranks, all micro-batches) plus
    ``sft_weight`` x the chosen answers' NLL summed over the step and divided by the step's global
    count of chosen answer tokens. Both denominators are known before any forward, so each
    micro-batch contributes sums scaled by grad_accum x world / count (DeepSpeed divides by
    grad_accum and averages over ranks) and the gradient does not depend on how the pairs are
    split over ranks and accumulation steps.
    """
    engine, dpo = ctx.engine, ctx.job.train.dpo
    skipped_before = engine.skipped_steps
    ctx.step_lr = float(engine.get_lr()[0])
    prepared = [_pairs_on_device(ctx, mb) for mb in micro_batches]
    # collective: (chosen answer tokens, answer tokens, real tokens) of the whole step, (3,).
    counts = torch.tensor([t["counts"] for t in prepared], dtype=torch.float64,
                          device=engine.device).sum(dim=0)  # fmt: skip
    dist.all_reduce(counts)
    pairs, n_chosen = ctx.data.global_rows, counts[0].clamp(min=1)
    scale = len(micro_batches) * ctx.io.world_size
    step_loss = torch.zeros((), device=engine.device)  # this rank's share of the step's objective
    stats = torch.zeros(5, dtype=torch.float64, device=engine.device)
    for k, t in enumerate(prepared):
        s = _pair_scores(ctx, t)
        total = s.losses.sum() / pairs
        if dpo.sft_weight:
            total = total + dpo.sft_weight * s.chosen_nll / n_chosen.to(total.dtype)
        _backward(ctx, total * scale, last=k == len(prepared) - 1)
        step_loss += total.detach()
        stats += torch.stack([s.losses.detach().sum() / pairs, s.chosen_rewards / pairs,
                              s.rejected_rewards / pairs, s.correct / pairs,
                              s.chosen_nll.detach() / n_chosen]).double()  # fmt: skip
    ctx.dpo_acc = stats if ctx.dpo_acc is None else ctx.dpo_acc + stats
    _finish_step(ctx, step_loss, skipped_before, micro_batches, int(counts[2]), counts[1])


def _local_grad_norm(module: torch.nn.Module) -> float:
    """ZeRO-0: gradients are already all-reduced at the boundary, so the local norm is global."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _step_flags(ctx: _Ctx, step_loss: torch.Tensor) -> tuple[list[int], str | None]:
    """collective, once per step: (ranks whose step loss is not finite, why the run must stop now
    or None), from one all_reduce of (world + 2,) flags, so every rank takes the same decisions."""
    world = ctx.io.world_size
    flags = torch.zeros(world + 2, device=ctx.engine.device)
    flags[ctx.io.rank] = (~torch.isfinite(step_loss)).float()  # no host sync before the reduce
    flags[world:] = torch.tensor(stop_flags(ctx.job.run_dir, ctx.io.rank))
    dist.all_reduce(flags)
    values = flags.tolist()
    return [r for r in range(world) if values[r]], stop_reason(values[world:])


def _health_check(ctx: _Ctx, ranks: list[int], skipped_before: int) -> None:
    """Stop or skip on a non-finite loss or gradient, naming the step and the rank(s)."""
    bad_grad = ctx.grad_norm is not None and not math.isfinite(ctx.grad_norm)
    if not ranks and not bad_grad:
        return
    step = ctx.state.step
    what = f"loss on rank(s) {ranks}" if ranks else "gradient norm"
    if ctx.job.train.nonfinite == "stop":
        raise NonFiniteError(f"step {step}: non-finite {what} (train.nonfinite: stop)")
    if ctx.engine.skipped_steps == skipped_before:
        raise NonFiniteError(
            f"step {step}: non-finite {what}, and DeepSpeed applied the update (zero_stage 0 in "
            "fp32 cannot skip); use deepspeed.zero_stage >= 1 or train.nonfinite: stop"
        )
    ctx.state.skipped_steps += 1
    if ctx.io.rank == 0:
        log.warning("step %d: non-finite %s; update skipped", step, what)


# ---------------------------------------------------------------- log / eval / checkpoint


def _write_metrics(ctx: _Ctx, row: dict[str, Any]) -> None:
    if ctx.io.rank == 0:
        log_row(ctx.job.run_dir, ctx.job.train, row)  # before the append: it reads the file
        with (Path(ctx.job.run_dir) / METRICS_NAME).open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _log_row(ctx: _Ctx) -> dict[str, Any]:
    """Metrics since the last log; all_reduce of the loss is a collective on log steps."""
    loss = ctx.loss_acc.clone()
    dist.all_reduce(loss)  # collective: every rank logs on the same steps
    now = time.perf_counter()
    t0, _ = ctx.last_log
    tokens_per_s = (ctx.state.tokens_seen - ctx.log_tokens) / max(now - t0, 1e-9)
    peak = ctx.job.train.peak_tflops
    row = {
        "step": ctx.state.step,
        "loss": float(loss) / max(ctx.steps_acc, 1),  # mean of the steps' token means
        "lr": ctx.step_lr,
        "tokens_per_s": tokens_per_s,
        "grad_norm": ctx.grad_norm,
        "mfu": None if peak is None
        else tokens_per_s * ctx.flops_per_token / (peak * 1e12 * ctx.io.world_size),
        "tokens_seen": ctx.state.tokens_seen,
        "epoch": ctx.state.epoch,
    }  # fmt: skip
    ctx.last_log, ctx.loss_acc, ctx.steps_acc = (now, ctx.state.step), None, 0
    ctx.log_tokens = ctx.state.tokens_seen
    return row


def _dpo_row(ctx: _Ctx) -> dict[str, float]:
    """DPO metrics since the last log (means over the steps' pairs); call before ``_log_row``,
    which resets the step count. collective: an all_reduce on log steps."""
    acc = ctx.dpo_acc.clone()
    dist.all_reduce(acc)  # every rank's shares add up to the step means
    acc = acc / max(ctx.steps_acc, 1)
    ctx.dpo_acc = None
    return {"dpo_loss": float(acc[0]), "rewards_chosen": float(acc[1]),
            "rewards_rejected": float(acc[2]), "reward_margin": float(acc[1] - acc[2]),
            "reward_accuracy": float(acc[3]), "chosen_nll": float(acc[4])}  # fmt: skip


def _evaluate(ctx: _Ctx) -> dict[str, float]:
    """Held-out loss over the same number of micro-batches on every rank (forward is a collective
    under ZeRO-3)."""
    ctx.engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=ctx.engine.device)  # (loss sum, tokens)
    with torch.no_grad():
        for mb in ctx.eval_data:
            total, count = _forward_loss(ctx, *_on_device(ctx, mb))
            sums += torch.stack([total.double(), count.double()])
    ctx.engine.train()
    dist.all_reduce(sums)  # collective
    eval_loss = float(sums[0] / sums[1].clamp(min=1))
    return {"eval_loss": eval_loss, "perplexity": math.exp(min(eval_loss, 50.0))}


def _evaluate_dpo(ctx: _Ctx) -> dict[str, float]:
    """Held-out pairs: the objective, reward accuracy and margin, and the perplexity of the chosen
    answers. Same micro-batch count on every rank (forward is a collective under ZeRO-3)."""
    ctx.engine.eval()
    # (dpo loss, chosen reward, rejected reward, correct, chosen NLL, chosen tokens, pairs) sums
    sums = torch.zeros(7, dtype=torch.float64, device=ctx.engine.device)
    with torch.no_grad():
        for mb in ctx.eval_data:
            s = _pair_scores(ctx, _pairs_on_device(ctx, mb))
            n = torch.tensor(float(len(s.losses)), device=ctx.engine.device)
            sums += torch.stack([s.losses.sum(), s.chosen_rewards, s.rejected_rewards, s.correct,
                                 s.chosen_nll, s.chosen_tokens, n]).double()  # fmt: skip
    ctx.engine.train()
    dist.all_reduce(sums)  # collective
    pairs, nll = sums[6].clamp(min=1), float(sums[4] / sums[5].clamp(min=1))
    dpo_loss = float(sums[0] / pairs)
    return {"eval_loss": dpo_loss + ctx.job.train.dpo.sft_weight * nll, "eval_dpo_loss": dpo_loss,
            "perplexity": math.exp(min(nll, 50.0)),
            "eval_rewards_chosen": float(sums[1] / pairs),
            "eval_rewards_rejected": float(sums[2] / pairs),
            "eval_reward_margin": float((sums[1] - sums[2]) / pairs),
            "eval_reward_accuracy": float(sums[3] / pairs)}  # fmt: skip


def _checkpoint(ctx: _Ctx, metrics: dict[str, Any]) -> None:
    """collective: every rank writes its shards and reports the dir.

    With ``io.checkpoint_root`` (the run dir on a filesystem every node sees) the shards go straight
    into the run dir, hashed once every rank has written; otherwise to a fresh local dir that the
    reporter copies into storage (S3: in the background, deleting the dir when done).
    """
    if ctx.io.checkpoint_root is None:
        _checkpoint_staged(ctx, metrics)
        return
    name, rank = checkpoint_name(ctx.state), ctx.io.rank
    dest = Path(ctx.io.checkpoint_root) / name
    if rank == 0 and dest.exists():  # left by a run stopped while writing it
        shutil.rmtree(dest)
    dist.barrier()  # collective
    _write_checkpoint(ctx, dest)
    dist.barrier()  # collective: every rank's files are complete before any is hashed
    write_integrity(dest, rank, share=(rank, ctx.io.world_size))
    ctx.io.report(metrics, dest, ctx.state.step, name)


def _checkpoint_staged(ctx: _Ctx, metrics: dict[str, Any]) -> None:
    """This rank's checkpoint in a fresh dir under ``train.s3.staging_dir`` (or the system temp
    dir), reported for the reporter to store; deleted here unless the reporter deletes it."""
    staging = ctx.job.train.s3.staging_dir
    if staging:
        Path(staging).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"raylm_ckpt_r{ctx.io.rank}_", dir=staging))
    try:
        _write_checkpoint(ctx, tmp)
        write_integrity(tmp, ctx.io.rank)  # last: covers everything this rank wrote
        ctx.io.report(metrics, tmp, ctx.state.step, checkpoint_name(ctx.state))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not ctx.io.reporter_deletes_checkpoints:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_checkpoint(ctx: _Ctx, out: Path) -> None:
    """This rank's part of a checkpoint: DeepSpeed's shards and RNG state; rank 0 adds the train
    state, the transformers config and (LoRA) the adapter config."""
    lora = ctx.job.train.lora.enabled
    ctx.engine.save_checkpoint(str(out), tag=f"global_step{ctx.state.step}",
                               exclude_frozen_parameters=lora)  # fmt: skip
    save_rng(out, ctx.io.rank)
    if ctx.io.rank == 0:
        write_state(out, ctx.state)
        if lora:  # export rebuilds base + adapter from this and model.init_from
            ctx.engine.module.peft_config["default"].save_pretrained(str(out))
        # The model's transformers config: export rebuilds the architecture from it.
        ctx.engine.module.config.to_json_file(str(out / HF_CONFIG_NAME))


def _after_step(ctx: _Ctx, last: bool) -> None:
    train, step = ctx.job.train, ctx.state.step
    dpo = train.task == "dpo"
    row: dict[str, Any] = {}
    if step % train.log_every == 0 or last:
        extra = _dpo_row(ctx) if dpo else {}  # before _log_row: it resets the step count
        row = {**_log_row(ctx), **extra}
    if ctx.eval_data and ((train.eval_every and step % train.eval_every == 0) or last):
        row = {**(row or {"step": step}), **(_evaluate_dpo(ctx) if dpo else _evaluate(ctx))}
    if row:
        _write_metrics(ctx, row)
    if step % train.checkpoint_every == 0 or last:
        _checkpoint(ctx, row or {"step": step})
    elif row:
        ctx.io.report(row, None, step)  # collective under Ray Train


def _preempted(ctx: _Ctx) -> bool:
    """SIGTERM on the driver or any worker (the step's flags) -> checkpoint this step and stop
    (True). collective when it checkpoints; every rank has the same ``ctx.stop``."""
    reason = ctx.stop
    if reason is None:
        return False
    if ctx.state.step % ctx.job.train.checkpoint_every:  # else _after_step just wrote it
        _checkpoint(ctx, {"step": ctx.state.step})
    if ctx.io.rank == 0:
        append_event(Path(ctx.job.run_dir), "preempt", step=ctx.state.step, reason=reason)
        log.warning("%s: checkpointed step %d and stopped", reason, ctx.state.step)
    return True


# ---------------------------------------------------------------- entry


def run_worker(job: WorkerJob, io: WorkerIO) -> TrainState:
    """Train until ``job.total_steps``; resumes from ``io.resume_candidates`` when one verifies."""
    ctx = _setup(job, io)
    step = _dpo_step if job.train.task == "dpo" else _train_step
    try:
        for micro_batches in ctx.data.iter_steps(ctx.state.step, job.total_steps):
            step(ctx, micro_batches)  # ends with io.after_step and the step's flags
            _after_step(ctx, last=ctx.state.step == job.total_steps)
            if ctx.state.step < job.total_steps and _preempted(ctx):
                break
        return ctx.state
    finally:
        _cleanup(ctx)


def _cleanup(ctx: _Ctx) -> None:
    if ctx.io.rank == 0:
        log.info("worker done at step %d: %s", ctx.state.step, asdict(ctx.state))
        close_trackers(ctx.job.run_dir)
    ctx.engine.destroy() if hasattr(ctx.engine, "destroy") else None
