"""``raylm train``: driver-side preflight, then a Ray Train V2 ``TorchTrainer`` running the loop.

The Ray edge of the training stage. :func:`plan_job` validates everything that can be checked on
the driver (datasets, tokenizer vs vocabulary, seq_len vs positions, batch divisibility, precision)
and raises ``TrainConfigError`` before any worker starts; the worker function only rebuilds the
typed job and calls ``training.loop.run_worker`` with Ray-backed reporting and resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.checkpoint import (
    TrainState,
    checkpoint_dirs,
    git_commit,
    package_versions,
    read_state,
    resume_mismatch,
    verify_checkpoint,
)
from training.config import DeepSpeedConfig, LoraConfig, ModelConfig, TrainConfig
from training.data import DatasetInfo, dataset_info, epoch_order
from training.ds_config import batch_plan, build_ds_config
from training.errors import CheckpointError, Preempted, TrainConfigError
from training.loop import WorkerHooks, WorkerIO, WorkerJob, run_worker
from training.lora import check_lora_targets, embedding_modules
from training.model import hf_config, meta_model, model_max_positions, packing_problem
from training.observe import driver_progress, mark_worker_warnings, resolve_trackers
from training.preempt import driver_sigterm
from training.records import EVENTS_NAME, METRICS_NAME, append_event, read_events
from training.storage import (
    RunView,
    check_s3_storage,
    download_checkpoints,
    fs_path,
    is_s3,
    list_checkpoints,
    parse_s3,
    pushing_reports,
    run_uri,
    s3_filesystem,
    worker_run,
)
from training.storage import open_run as _open_run

if TYPE_CHECKING:
    from ray.train import CheckpointUploadMode

    from cluster.config import RaylmConfig

__all__ = [
    "FinishedRun",
    "finish_if_done",
    "finished_checkpoint",
    "job_from_dict",
    "job_to_dict",
    "open_run",
    "plan_job",
    "run_dir",
    "train",
]

log = logging.getLogger(__name__)


def run_dir(cfg: RaylmConfig) -> Path:
    """The run dir of a local (or mounted) ``train.storage_path``; S3 runs: :func:`open_run`."""
    if is_s3(cfg.train.storage_path):
        raise ValueError(f"{run_uri(cfg.train.storage_path, cfg.name)} is on S3: use open_run(cfg)")
    return Path(cfg.train.storage_path).resolve() / cfg.name


def open_run(cfg: RaylmConfig) -> contextlib.AbstractContextManager[RunView]:
    """The run lock (``flock``; S3: a lease object) and the driver's view of the run dir."""
    s3 = cfg.train.s3
    return _open_run(cfg.train.storage_path, cfg.name, s3.endpoint_url, s3.region)


def _ray_storage(cfg: RaylmConfig) -> tuple[str, Any]:
    """``RunConfig(storage_path, storage_filesystem)``: an absolute local path and None, or the
    S3 path without its scheme and the S3 filesystem every process of the run uses."""
    path = cfg.train.storage_path
    if not is_s3(path):
        return str(Path(path).resolve()), None
    return fs_path(path), s3_filesystem(parse_s3(path, cfg.train.s3.endpoint_url,
                                                 cfg.train.s3.region))  # fmt: skip


def _vocab_and_pad(cfg: RaylmConfig, infos: list[DatasetInfo]) -> tuple[int, int]:
    """Model vocabulary size and pad id; the tokenizer must fit the model's embedding.

    A base model (``model.init_from``) whose vocabulary is smaller than the tokenizer (e.g. SFT
    data prepared with raylm's default chat template, which adds role and end-of-turn tokens)
    gets its embeddings resized to the tokenizer length in the workers; the vocab returned (and
    recorded in the resume keys) is then the tokenizer length.
    """
    from transformers import AutoTokenizer

    tok_path = infos[0].tokenizer_path
    if not tok_path or not Path(tok_path).is_dir():
        raise TrainConfigError(
            f"train.datasets[0]: tokenizer dir {tok_path!r} in its manifest is missing"
        )
    tok = AutoTokenizer.from_pretrained(tok_path)
    n_tok = len(tok)
    if cfg.model.init_from:
        base = hf_config(cfg.model, n_tok).vocab_size
        vocab = max(base, n_tok)
        if vocab > base:
            log.warning("model.init_from: vocabulary %d < tokenizer %d (%s); the embeddings are "
                        "resized to %d", base, n_tok, tok_path, vocab)  # fmt: skip
    else:
        vocab = cfg.model.vocab_size or n_tok
    if n_tok > vocab:
        raise TrainConfigError(
            f"model.vocab_size: model vocabulary {vocab} is smaller than the tokenizer's {n_tok}"
        )
    pad = infos[0].pad_token_id
    if pad is None:
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return vocab, int(pad)


# data.mode values each train.task can read: SFT may mix pretraining text in (loss on every token);
# DPO trains on preference pairs only.
_TASK_MODES = {"pretrain": ("pretrain",), "sft": ("sft", "pretrain"), "dpo": ("preference",)}


def _datasets(cfg: RaylmConfig) -> list[DatasetInfo]:
    if not cfg.train.datasets:
        raise TrainConfigError(
            "train.datasets: empty; give at least one `raylm data prepare` output"
        )
    infos = [
        dataset_info(d.path, key=f"train.datasets[{i}].path")
        for i, d in enumerate(cfg.train.datasets)
    ]
    for i, info in enumerate(infos):
        if info.mode not in _TASK_MODES[cfg.train.task]:
            raise TrainConfigError(
                f"train.datasets[{i}].path: {info.path} was prepared with data.mode "
                f"{info.mode}, which train.task {cfg.train.task} cannot train on (it takes "
                f"{' or '.join(_TASK_MODES[cfg.train.task])} data)"
            )
    seq_lens = {i.seq_len for i in infos}
    if len(seq_lens) > 1:
        raise TrainConfigError(
            f"train.datasets: all datasets need one seq_len (got {sorted(seq_lens)})"
        )
    first = infos[0].tokenizer_fingerprint
    for i, info in enumerate(infos[1:], start=1):
        if first and info.tokenizer_fingerprint and info.tokenizer_fingerprint != first:
            raise TrainConfigError(
                f"train.datasets[{i}].path: {info.path} was tokenized with another tokenizer "
                f"({info.tokenizer_path}) than train.datasets[0] ({infos[0].tokenizer_path}); "
                "prepare every mixed dataset with one tokenizer"
            )
    return infos


def _provenance(cfg: RaylmConfig, infos: list[DatasetInfo]) -> dict[str, Any]:
    manifests = {
        i.path: hashlib.sha256((Path(i.path) / "manifest.json").read_bytes()).hexdigest()
        for i in infos
    }
    return {"seed": cfg.seed, "run_name": cfg.name, "manifest_sha256": manifests,
            "tokenizer_path": infos[0].tokenizer_path, "git_commit": git_commit(),
            "trust_remote_code": cfg.model.trust_remote_code}  # fmt: skip


def _check_init_from(path: str, key: str = "model.init_from") -> None:
    """A base model dir that exists, is a transformers dir and has safetensors weights."""
    root = Path(path)
    if not root.is_dir():
        raise TrainConfigError(f"{key}: {path} does not exist")
    if not (root / "config.json").is_file():
        raise TrainConfigError(f"{key}: {path} has no config.json (not a HF model dir)")
    if not any((root / n).is_file() for n in ("model.safetensors", "model.safetensors.index.json")):
        raise TrainConfigError(
            f"{key}: {path} has no model.safetensors or model.safetensors.index.json "
            "(weights load from safetensors only)"
        )


def _check_packing(cfg: RaylmConfig, infos: list[DatasetInfo]) -> None:
    """Packed rows need a model whose attention keeps documents apart by position_ids."""
    packed = [i for i, info in enumerate(infos) if info.packed]
    if not packed:
        return
    problem = packing_problem(hf_config(cfg.model, vocab_size=8))
    if problem:
        i = packed[0]
        raise TrainConfigError(
            f"train.datasets[{i}].path: {infos[i].path} packs several documents per row, but the "
            f"model cannot keep them apart: {problem}; prepare it unpacked (data.mode: sft with "
            "data.sft.pack: false)"
        )


def _check_lora(cfg: RaylmConfig, vocab: int) -> LoraConfig:
    """The LoRA section with its targets checked on a meta-device model; when the tokenizer
    outgrows the base vocabulary, the input embedding and an untied output head (as the model
    names them) join ``modules_to_save``, or the export would carry untrained rows for the new
    tokens."""
    lora = cfg.train.lora
    if not cfg.model.init_from:
        raise TrainConfigError(
            "train.lora.enabled: LoRA trains adapters on a frozen base; set model.init_from"
        )
    base = hf_config(cfg.model, vocab)
    model = meta_model(base)
    check_lora_targets(model, lora)
    if vocab <= base.vocab_size:
        return lora
    embed, head = embedding_modules(model)
    saved = list(lora.modules_to_save)
    added = [m for m in (embed, head) if m and not any(s.split(".")[-1] == m for s in saved)]
    if added:
        log.warning("train.lora.modules_to_save: the tokenizer (%d) outgrows the base vocabulary "
                    "(%d); %s train in full and are saved with the adapter", vocab,
                    base.vocab_size, added)  # fmt: skip
    return lora.model_copy(update={"modules_to_save": saved + added})


def _plan_dpo(
    cfg: RaylmConfig, train: TrainConfig, infos: list[DatasetInfo], vocab: int
) -> tuple[TrainConfig, list[str]]:
    """``train.dpo`` with the reference resolved (``auto`` decided, the reference model an absolute
    path) and, for a precomputed reference, each dataset's reference dir."""
    dpo = train.dpo
    if not cfg.model.init_from:
        raise TrainConfigError("model.init_from: train.task dpo starts from a trained model (usually "
                               "the SFT export), which is also the default reference; set it")  # fmt: skip
    if dpo.reference_model:
        _check_init_from(dpo.reference_model, "train.dpo.reference_model")
    ref_model = Path(dpo.reference_model or cfg.model.init_from).resolve()
    same_base = ref_model == Path(cfg.model.init_from).resolve()
    mode = dpo.reference
    if mode == "auto":
        mode = "adapter_disabled" if train.lora.enabled and same_base else "precomputed"
    if mode == "adapter_disabled" and not train.lora.enabled:
        raise TrainConfigError("train.dpo.reference: adapter_disabled is the frozen base with the "
                               "LoRA adapter switched off; it needs train.lora.enabled: true")  # fmt: skip
    if mode == "adapter_disabled" and not same_base:
        raise TrainConfigError(f"train.dpo.reference: adapter_disabled scores with model.init_from, "
                               f"but train.dpo.reference_model is {dpo.reference_model}; use "
                               "precomputed")  # fmt: skip
    resolved = dpo.model_copy(update={"reference": mode, "reference_model": str(ref_model)})
    refs: list[str] = []
    if mode == "precomputed":
        from training.reference import model_content_hash, reference_dir

        digest = model_content_hash(ref_model)
        refs = [reference_dir(i.path, digest, vocab, cfg.seed, cfg.deepspeed.precision)
                for i in infos]  # fmt: skip
    return train.model_copy(update={"dpo": resolved}), refs


def _resume_keys(
    cfg: RaylmConfig, train: TrainConfig, vocab: int, seq_len: int, manifests: dict[str, str]
) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: a change in any of these would silently
    train other rows (seed, datasets), another objective (task) or fail deep inside DeepSpeed
    (shapes, ZeRO stage, precision, world size). Keys safe to change are in docs/train.md."""
    keys: dict[str, Any] = {
        "model.architecture": cfg.model.architecture, "model.shape": cfg.model.shape(),
        "model.init_from": cfg.model.init_from, "model.vocab_size": vocab, "seq_len": seq_len,
        "seed": cfg.seed, "train.task": train.task,
        "train.datasets": [{"path": str(Path(d.path).resolve()), "weight": d.weight,
                            "manifest_sha256": manifests[str(Path(d.path).resolve())]}
                           for d in train.datasets],
        "train.global_batch_tokens": train.global_batch_tokens,
        "deepspeed.zero_stage": cfg.deepspeed.zero_stage,
        "deepspeed.precision": cfg.deepspeed.precision,
        "scaling.num_workers": cfg.scaling.num_workers,
    }  # fmt: skip
    if train.lora.enabled:  # adapters of another shape cannot load
        keys["train.lora"] = train.lora.model_dump(mode="json")
    if train.task == "dpo":  # another beta, loss or reference is another objective
        keys["train.dpo"] = train.dpo.model_dump(mode="json")
    return keys


def plan_job(cfg: RaylmConfig) -> WorkerJob:
    """Resolve and validate a run on the driver; raises TrainConfigError naming the key."""
    if cfg.model.init_from:
        _check_init_from(cfg.model.init_from)
    infos = _datasets(cfg)
    seq_len = infos[0].seq_len
    _check_packing(cfg, infos)
    max_pos = model_max_positions(cfg.model)
    if max_pos is not None and seq_len > max_pos:
        raise TrainConfigError(
            f"model.max_position_embeddings: {max_pos} is below the dataset seq_len {seq_len}"
        )
    vocab, pad = _vocab_and_pad(cfg, infos)
    train_cfg = cfg.train
    if train_cfg.lora.enabled:
        train_cfg = train_cfg.model_copy(update={"lora": _check_lora(cfg, vocab)})
    references: list[str] = []
    if train_cfg.task == "dpo":
        train_cfg, references = _plan_dpo(cfg, train_cfg, infos, vocab)
    world = cfg.scaling.num_workers
    plan = batch_plan(cfg.train.global_batch_tokens, seq_len, cfg.train.micro_batch_size, world)
    if cfg.train.nonfinite == "skip" and cfg.deepspeed.zero_stage == 0:
        raise TrainConfigError("train.nonfinite: skip needs deepspeed.zero_stage >= 1 (ZeRO skips "
                               "non-finite updates; stage 0 cannot)")  # fmt: skip
    weights = [d.weight for d in cfg.train.datasets]
    epoch_rows = len(epoch_order(0, cfg.seed, [i.rows["train"] for i in infos], weights))
    steps_per_epoch = epoch_rows // plan.global_rows
    if steps_per_epoch == 0:
        raise TrainConfigError(f"train.global_batch_tokens: one step needs {plan.global_rows} rows, "
                               f"an epoch has {epoch_rows}")  # fmt: skip
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    # Raises for fp16 without CUDA; the workers build the same dict.
    build_ds_config(cfg.train, cfg.deepspeed, seq_len=seq_len, world_size=world, total_steps=total,
                    use_gpu=cfg.scaling.use_gpu, cuda_available=cfg.scaling.use_gpu)  # fmt: skip
    provenance = _provenance(cfg, infos)
    resume_keys = _resume_keys(cfg, train_cfg, vocab, seq_len, provenance["manifest_sha256"])
    # What training reads: a changed serve port or eval task list is not a different run (nor,
    # outside DPO, the train.dpo section: hashes of earlier runs stay what they were).
    trained = cfg.model_dump(mode="json", include={"name", "seed", "model", "train", "deepspeed",
                                                   "scaling"},
                             exclude=None if cfg.train.task == "dpo" else {"train": {"dpo"}})  # fmt: skip
    blob = json.dumps(trained, sort_keys=True).encode()
    if is_s3(cfg.train.storage_path):  # last: the checks above need no network
        check_s3_storage(cfg.train.storage_path, cfg.train.s3.endpoint_url, cfg.train.s3.region)
    # Workers run in their own working directory: hand them absolute paths.
    model = cfg.model
    if model.init_from:
        model = model.model_copy(update={"init_from": str(Path(model.init_from).resolve())})
    return WorkerJob(
        model=model, train=resolve_trackers(train_cfg), deepspeed=cfg.deepspeed, seed=cfg.seed,
        run_dir=run_uri(cfg.train.storage_path, cfg.name), datasets=infos, weights=weights,
        seq_len=seq_len, vocab_size=vocab, pad_id=pad, total_steps=total,
        config_hash=hashlib.sha256(blob).hexdigest(), resume_keys=resume_keys,
        use_gpu=cfg.scaling.use_gpu, versions=package_versions(), provenance=provenance,
        reference=references,
    )  # fmt: skip


def job_to_dict(job: WorkerJob) -> dict[str, Any]:
    """JSON-able form for ``train_loop_config``."""
    out = asdict(job)
    for key in ("model", "train", "deepspeed"):
        out[key] = getattr(job, key).model_dump(mode="json")
    return out


def job_from_dict(raw: dict[str, Any]) -> WorkerJob:
    """Typed job again, validated (first line of the worker)."""
    raw = dict(raw)
    raw["model"] = ModelConfig.model_validate(raw["model"])
    raw["train"] = TrainConfig.model_validate(raw["train"])
    raw["deepspeed"] = DeepSpeedConfig.model_validate(raw["deepspeed"])
    raw["datasets"] = [DatasetInfo(**d) for d in raw["datasets"]]
    return WorkerJob(**raw)


# ---------------------------------------------------------------- worker side (inside Ray)


def _ray_report(
    metrics: dict[str, Any],
    checkpoint_dir: Path | None,
    step: int,
    dir_name: str | None = None,
    *,
    upload: CheckpointUploadMode,
) -> None:
    """Ray Train's report. ``upload`` is how Ray stores a checkpoint: ``NO_UPLOAD`` registers the
    dir where the ranks wrote it (in place in the run dir); ``ASYNC`` copies it into storage from
    Ray's upload thread while the next steps run, then deletes the local dir."""
    import ray.train
    from ray.train import CheckpointUploadMode

    # collective: Ray Train's report is a barrier; every rank calls it on the same steps.
    if checkpoint_dir is None:
        ray.train.report(metrics)
        return
    where: dict[str, Any] = {"checkpoint_upload_mode": upload}
    if upload is not CheckpointUploadMode.NO_UPLOAD:
        where["checkpoint_dir_name"] = dir_name or f"checkpoint_{step:08d}"
    ray.train.report(
        metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)), **where
    )


def _resume_candidates(job: WorkerJob) -> list[Path]:
    """Ray's latest checkpoint first, then the others in the run dir, newest first. Without Ray's
    record of the run (checkpoints copied into a new storage path, or written by another launcher)
    the run dir's checkpoints alone, as the driver's resume check and ``raylm export`` see them."""
    import ray.train

    latest = ray.train.get_checkpoint()
    older = checkpoint_dirs(job.run_dir)
    if latest is None:
        return older
    first = Path(latest.path)
    return [first] + [p for p in older if p.resolve() != first.resolve()]


def _s3_resume_candidates(fs: Any) -> Iterable[Path]:
    """S3: Ray's latest checkpoint, then older ones, each downloaded when the loop reaches it.

    The loop stops iterating at the first that verifies and loads; the generator is then closed
    (CPython: when ``_maybe_resume`` returns) and its download deleted.
    """
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None:
        return []
    run = latest.path.rstrip("/").rsplit("/", 1)[0]
    return download_checkpoints(fs, list_checkpoints(fs, run, first=latest.path))


def _train_fn(config: dict[str, Any]) -> None:
    job = job_from_dict(config["job"])
    import ray.train
    import torch
    from ray.train import CheckpointUploadMode

    mark_worker_warnings()  # the driver shows these; the rest of a worker's output goes to its log
    if not job.use_gpu:  # workers share the cores: no oversubscription
        torch.set_num_threads(max(1, int(config.get("threads", 1))))
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    fs = config.get("run_fs")
    if fs is None:  # a filesystem every worker sees (one node, or a shared mount): in place
        report = functools.partial(_ray_report, upload=CheckpointUploadMode.NO_UPLOAD)
        io = _worker_io(config, rank, report, lambda: _resume_candidates(job))
        io.checkpoint_root = Path(job.run_dir)
        run_worker(job, io)
        return
    # S3: the loop's run dir is this worker's local mirror of the run dir.
    remote = job.run_dir
    with worker_run(fs, remote, rank) as mirror:
        job = dataclasses.replace(job, run_dir=str(mirror.local))
        # Checkpoints upload in Ray's background thread while training goes on; Ray deletes each
        # rank's local dir once uploaded and waits for the last upload before the run ends.
        report = pushing_reports(
            mirror, functools.partial(_ray_report, upload=CheckpointUploadMode.ASYNC)
        )
        io = _worker_io(config, rank, report, lambda: _s3_resume_candidates(fs))
        io.reporter_deletes_checkpoints = True
        io.name_of = lambda local: f"{remote.rstrip('/')}/{local.name}"
        run_worker(job, io)


def _worker_io(
    config: dict[str, Any],
    rank: int,
    report: Callable[..., None],
    candidates: Callable[[], Iterable[Path]],
) -> WorkerIO:
    import ray.train

    hooks: WorkerHooks | None = config.get("hooks")
    return WorkerIO(rank=rank, world_size=ray.train.get_context().get_world_size(), report=report,
                    resume_candidates=candidates,
                    after_step=hooks.after_step if hooks else None,
                    before_update=hooks.before_update if hooks else None)  # fmt: skip


def train(cfg: RaylmConfig, job: WorkerJob | None = None, hooks: WorkerHooks | None = None) -> Any:
    """Run (or resume) ``cfg.name`` under ``cfg.train.storage_path`` under the run lock; returns
    Ray's Result, or a :class:`FinishedRun` when the run had nothing left to train (see
    :func:`finish_if_done`). Raises :class:`Preempted` when the workers stopped on SIGTERM.

    ``hooks`` are callables handed to every worker's loop (they travel by cloudpickle in
    ``train_loop_config``): the tests' fault injection and gradient capture. None in production.
    """
    job = job or plan_job(cfg)
    with open_run(cfg) as run:
        if run.fs is None:
            _check_resume(cfg, run.local, job)
            finished = _finish(cfg, job, run)
            if finished is not None:
                return finished
        if job.reference:  # DPO: the reference log-probs, once, before any worker starts
            from training.reference import ensure_references

            ensure_references(job, cfg.scaling)
        result = _fit_workers(cfg, job, _trainer(cfg, job, hooks), run)
        _export(cfg, run)
    return result


def _trainer(cfg: RaylmConfig, job: WorkerJob, hooks: WorkerHooks | None) -> Any:
    """The Ray Train ``TorchTrainer`` running :func:`_train_fn` on ``cfg.scaling``'s workers."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    from training.ray_backend import PreemptibleTorchConfig

    sc = cfg.scaling
    storage, fs = _ray_storage(cfg)
    return TorchTrainer(
        _train_fn,
        train_loop_config={
            "job": job_to_dict(job),
            "threads": sc.cpus_per_worker,
            **({"hooks": hooks} if hooks is not None else {}),
            **({"run_fs": fs} if fs is not None else {}),  # S3: side files go through it too
        },  # fmt: skip
        scaling_config=RayScaling(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker},
            placement_strategy=sc.placement_strategy,
        ),  # fmt: skip
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=sc.max_failures),
        ),
        torch_config=PreemptibleTorchConfig(
            backend="nccl" if sc.use_gpu else "gloo", timeout_s=sc.collective_timeout_s
        ),  # fmt: skip
    )


def _check_resume(cfg: RaylmConfig, rd: Path, job: WorkerJob) -> None:
    """Refuse before any worker starts when the run's checkpoints were trained with settings a
    resume cannot keep (seed, datasets, task, shapes, ZeRO stage, precision, world size), naming
    each key with its old and new value. Reads the newest readable state file only (no hashing);
    the workers still verify what they load. S3 runs are checked by the workers alone."""
    for cand in checkpoint_dirs(rd):
        try:
            saved = read_state(cand)
        except (OSError, ValueError, TypeError, CheckpointError):
            continue  # truncated: the workers skip it too
        diff = resume_mismatch(saved.resume_keys, job.resume_keys)
        if diff:
            raise TrainConfigError(
                f"name: run {cfg.name!r} has checkpoints ({cand.name}) trained with other "
                f"settings; resuming would change {', '.join(diff)}. Keep the old values, or "
                "start a new run with --set name=..."
            )
        return


@dataclasses.dataclass(frozen=True)
class FinishedRun:
    """What :func:`train` returns when the run had nothing left to train (else Ray's Result)."""

    checkpoint: Any  # ray.train.Checkpoint of the last step
    step: int


def finished_checkpoint(rd: Path, job: WorkerJob) -> tuple[Path, TrainState] | None:
    """The run's newest intact checkpoint when it holds the job's last step under the same resume
    keys: a re-run would resume there and train nothing, so no worker needs to start.

    Only a checkpoint of the last step is hashed (its integrity manifest, as the workers check it):
    a run with steps left is told by the state file alone, and its workers verify what they load.
    """
    for cand in checkpoint_dirs(rd):
        try:
            state = read_state(cand)
        except (OSError, ValueError, TypeError):
            continue  # incomplete: the workers skip it too
        if state.step < job.total_steps or resume_mismatch(state.resume_keys, job.resume_keys):
            return None
        try:
            return cand, verify_checkpoint(cand)
        except CheckpointError:
            continue  # e.g. a truncated last checkpoint beside its re-trained twin
    return None


def finish_if_done(cfg: RaylmConfig, job: WorkerJob) -> FinishedRun | None:
    """A local run whose last step is already checkpointed (and verifies) needs no worker, nor
    Ray: under the run lock, refuse changed resume keys, record the resume (``finished: true``),
    export when configured, and return a :class:`FinishedRun`. None otherwise (S3 runs leave this
    to the workers); a run with steps left costs a state-file read here."""
    if is_s3(cfg.train.storage_path):
        return None
    with open_run(cfg) as run:
        _check_resume(cfg, run.local, job)
        return _finish(cfg, job, run)


def _finish(cfg: RaylmConfig, job: WorkerJob, run: RunView) -> FinishedRun | None:
    """:func:`finish_if_done`'s work inside a held run lock, after the resume-key check."""
    done = finished_checkpoint(run.local, job)
    if done is None:
        return None
    import ray.train  # the Checkpoint class only: no Ray instance is needed

    ckpt, state = done
    append_event(run.local, "resume", step=state.step, checkpoint=str(ckpt), skipped=[],
                 finished=True)  # fmt: skip
    log.info("run %s already finished at step %d (%s): nothing to train", cfg.name, state.step,
             ckpt)  # fmt: skip
    _export(cfg, run)
    return FinishedRun(ray.train.Checkpoint.from_directory(str(ckpt)), state.step)


def _export(cfg: RaylmConfig, run: RunView) -> None:
    """``train.export_dir``, when set: the run's newest intact checkpoint as a HF model dir."""
    if cfg.train.export_dir:
        from training.export import export

        src = run.uri if run.fs is not None else run.local
        out = export(src, Path(cfg.train.export_dir).resolve(), dtype=cfg.train.export_dtype,
                     filesystem=run.fs, max_shard_size=cfg.train.export_max_shard_size)  # fmt: skip
        log.info("exported %s to %s", run.uri, out)


def _fit_workers(cfg: RaylmConfig, job: WorkerJob, trainer: Any, run: RunView) -> Any:
    """Ray Train's ``fit()`` with the driver's SIGTERM handler, log follower and progress bar."""
    rd = run.local
    run.sync()  # S3: the resolved config goes up before the workers start
    events_before = len(read_events(rd))
    progress = sys.stderr.isatty() if cfg.train.progress is None else cfg.train.progress
    with (
        driver_sigterm(rd),
        run.follow(progress),
        driver_progress(rd, job.total_steps, cfg.train.progress),
    ):
        result = trainer.fit()
    run.sync(pull=[EVENTS_NAME, METRICS_NAME])  # S3: what the workers wrote, for the checks
    stops = [e for e in read_events(rd)[events_before:] if e["event"] == "preempt"]
    if stops:
        raise Preempted(stops[-1]["step"], stops[-1]["reason"])
    return result
