"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on every worker.

One optimiser step ("step") consumes ``global_batch_size`` images: each of the ``W`` workers
runs ``accum_steps`` micro-batches of ``micro_batch`` images, gradients are all-reduced by DDP
on the last micro-batch only. The step counter counts optimiser steps since the job began
and is stored in every checkpoint, so a resumed attempt continues it.

Determinism: before each epoch, data order, augmentation and masks are reseeded from
(seed, epoch, rank). Checkpoints are taken at epoch ends, so a resumed run sees the same
batches and masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import resource
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .artifacts import LOGS, MetricsWriter
from .checkpointing import (
    ManifestUploader,
    checkpoint_name,
    read_state,
    retire_old_manifests,
    rng_state,
    set_rng_state,
    write_state,
)
from .data import (
    ImageFolderDataset,
    eval_transform,
    index_dataset,
    seed_worker,
    shard_indices,
    train_transform,
)
from .export import export_model, preview_strips, write_previews
from .model import (
    build_module,
    create_optimizer,
    create_scheduler,
    load_initial_encoder,
    resolve_init_from,
    unwrap,
)
from .spec import JobSpec
from .storage import S3Settings, open_root, write_bytes

logger = logging.getLogger(__name__)

NUM_PREVIEWS = 4


@dataclass(frozen=True)
class WorkerConfig:
    """``train_loop_config`` of the TorchTrainer (plain data so that Ray can ship it)."""

    spec: dict[str, Any]
    storage_root: str
    tenant: str
    job_id: str
    s3: dict[str, Any] | None = None
    metrics_flush_s: float = 5.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class _LogBuffer(logging.Handler):
    """Keeps this attempt's log lines so rank 0 can store them under ``logs/``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    wc = WorkerConfig(**config)
    spec = JobSpec.model_validate(wc.spec)
    s3 = S3Settings(**wc.s3) if wc.s3 else None
    root = open_root(wc.storage_root, s3)
    job = root.job_prefix(wc.tenant, wc.job_id)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    is_main = rank == 0

    logs = _LogBuffer()
    if is_main:
        logging.getLogger("workers").addHandler(logs)
        logging.getLogger("workers").setLevel(logging.INFO)
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    seed = spec.train.seed
    torch.manual_seed(_seed(seed, rank))
    np.random.seed(_seed(seed, rank, 1) % 2**32)
    random.seed(_seed(seed, rank, 2))

    # --- data
    splits = index_dataset(spec.data, s3)
    img_size = spec.arch_config().img_size
    n_steps = spec.steps_per_epoch(len(splits.train))
    if n_steps < 1:
        raise ValueError(
            f"{len(splits.train)} training images cannot fill one step of "
            f"{spec.train.global_batch_size} images"
        )
    train_ds = ImageFolderDataset(
        splits.fs_uri, splits.train, train_transform(img_size, spec.data), s3
    )
    sampler = DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    loader_gen = torch.Generator()
    train_loader = DataLoader(
        train_ds,
        batch_size=spec.micro_batch,
        sampler=sampler,
        drop_last=True,
        num_workers=spec.data.loader_workers,
        worker_init_fn=seed_worker,
        generator=loader_gen,
        persistent_workers=False,
    )
    val_ds = ImageFolderDataset(splits.fs_uri, splits.val, eval_transform(img_size), s3)

    # --- model, optimiser, schedule
    num_classes = 0
    if spec.kind == "finetune":
        assert spec.finetune is not None
        num_classes = spec.finetune.num_classes or splits.num_classes
    built = build_module(spec, num_classes)
    optimizer = create_optimizer(spec, built)
    scheduler = create_scheduler(spec, optimizer, n_steps)

    start_epoch, step = 0, 0
    init: dict[str, Any] | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = read_state(d)
        _check_compatible(state, spec, built)
        built.module.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        logger.info(
            "rank %d resumed from %s at epoch %d, step %d", rank, checkpoint.path, start_epoch, step
        )
    elif spec.kind == "finetune" and spec.finetune.init_from != "scratch":
        fs, path = resolve_init_from(spec.finetune.init_from, root, wc.tenant, s3)
        init = load_initial_encoder(built.encoder, fs, path)
    scheduler.step_update(num_updates=step)

    model = ray.train.torch.prepare_model(built.module)
    params = [p for p in built.module.parameters() if p.requires_grad]

    writer = None
    if is_main:
        writer = MetricsWriter(root.fs, job, flush_every_s=wc.metrics_flush_s)
        attempt = writer.begin(resume_step=step)
        writer.log(
            {
                "type": "event",
                "event": "resume" if step else "start",
                "step": step,
                "epoch": start_epoch,
                "attempt": attempt,
                "world_size": world,
                "steps_per_epoch": n_steps,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "device": str(device),
                "init": init,
            }
        )
        writer.flush()
        logger.info(
            "%s %s: %d train / %d val images, %d steps/epoch x %d epochs, %d workers x %d micro x %d accum",
            spec.kind, spec.model, len(splits.train), len(splits.val), n_steps, spec.train.epochs,
            world, spec.micro_batch, spec.accum_steps,
        )  # fmt: skip

    finetune = spec.finetune
    mixup = None
    if finetune is not None and (finetune.mixup > 0 or finetune.cutmix > 0):
        mixup = Mixup(
            mixup_alpha=finetune.mixup,
            cutmix_alpha=finetune.cutmix,
            prob=finetune.mixup_prob,
            label_smoothing=finetune.label_smoothing,
            num_classes=num_classes,
        )
    soft_ce = SoftTargetCrossEntropy()
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=spec.train.precision == "bf16"
    )
    accum = spec.accum_steps
    max_norm = spec.train.grad_clip or math.inf
    mask_gen = torch.Generator()

    for epoch in range(start_epoch, spec.train.epochs):
        sampler.set_epoch(epoch)
        loader_gen.manual_seed(_seed(seed, epoch, rank, 3))
        torch.manual_seed(_seed(seed, epoch, rank, 4))
        mask_gen.manual_seed(_seed(seed, epoch, rank, 5))
        model.train()
        epoch_loss, epoch_n = 0.0, 0
        batches = iter(train_loader)
        for i in range(n_steps):
            t0 = time.perf_counter()
            step_loss = 0.0
            for micro in range(accum):
                images, labels = next(batches)
                images, labels = (
                    images.to(device, non_blocking=True),
                    labels.to(device, non_blocking=True),
                )
                sync = micro == accum - 1 or world == 1
                with contextlib.nullcontext() if sync else model.no_sync(), autocast:
                    if spec.kind == "pretrain":
                        mask = unwrap(model).random_mask(images.shape[0], generator=mask_gen)
                        loss, _, _ = model(images, mask)
                    else:
                        if mixup is not None:
                            images, targets = mixup(images, labels)
                            loss = soft_ce(model(images).float(), targets)
                        else:
                            logits = model(images).float()
                            loss = F.cross_entropy(
                                logits, labels, label_smoothing=finetune.label_smoothing
                            )
                    (loss / accum).backward()
                step_loss += float(loss.detach()) / accum
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            lr = max(g["lr"] for g in optimizer.param_groups)  # the lr this step used
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(num_updates=step)
            loss_sum, n = _all_reduce([step_loss, 1.0], device)
            mean_loss = loss_sum / n
            epoch_loss += mean_loss
            epoch_n += 1
            dt = time.perf_counter() - t0
            if writer is not None:
                writer.log(
                    {
                        "type": "step",
                        "step": step,
                        "epoch": epoch,
                        "loss": mean_loss,
                        "lr": lr,
                        "images_per_s": spec.train.global_batch_size / dt,
                        "images_per_s_per_worker": spec.per_worker_batch / dt,
                        "step_time_s": dt,
                        "grad_norm": grad_norm,
                        "peak_memory_mb": _peak_memory_mb(device),
                    },
                    hold=i == n_steps - 1,  # the epoch record follows in the same chunk
                )

        epoch_metrics: dict[str, Any] = {"train_loss": epoch_loss / max(epoch_n, 1)}
        if spec.kind == "finetune" and len(val_ds):
            epoch_metrics.update(
                evaluate(unwrap(model), val_ds, rank, world, device, spec, autocast)
            )
        elif spec.kind == "pretrain" and len(val_ds):
            epoch_metrics["val_loss"] = evaluate_mim(
                unwrap(model), val_ds, rank, world, device, spec, autocast
            )
        done = epoch + 1
        if writer is not None:
            writer.log({"type": "epoch", "step": step, "epoch": done, **epoch_metrics}, hold=True)
            writer.flush()
            logger.info("epoch %d/%d step %d: %s", done, spec.train.epochs, step, epoch_metrics)

        if done % spec.checkpoint.every_epochs == 0 or done == spec.train.epochs:
            _checkpoint(
                built,
                optimizer,
                scheduler,
                spec,
                done,
                step,
                epoch_metrics,
                is_main,
                root,
                job,
                writer,
            )
        if writer is not None:
            _store_logs(root.fs, job, writer.attempt, logs)

    if is_main:
        assert writer is not None
        _finish(spec, built, val_ds, device, root.fs, job, step, writer)
        _store_logs(root.fs, job, writer.attempt, logs)
        logging.getLogger("workers").removeHandler(logs)


def _check_compatible(state: dict[str, Any], spec: JobSpec, built) -> None:
    saved = state.get("arch")
    if saved is not None and saved != _jsonable(built.cfg.to_dict()):
        raise ValueError(
            f"checkpoint architecture {saved} does not match the job's {built.cfg.to_dict()}"
        )
    if state.get("kind") not in (None, spec.kind):
        raise ValueError(f"checkpoint is from a {state['kind']} job, this is a {spec.kind} job")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _checkpoint(
    built, optimizer, scheduler, spec, epoch, step, metrics, is_main, root, job, writer
) -> None:
    """All ranks call ``ray.train.report``; rank 0 attaches the checkpoint."""
    name = checkpoint_name(epoch)
    report = {"epoch": epoch, "step": step, **metrics}
    if not is_main:
        ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="greenmim-ckpt-") as tmp:
        state = {
            "kind": spec.kind,
            "epoch": epoch,
            "step": step,
            "model": built.module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": None,  # bf16 needs no loss scaling; fp16 is not offered
            "rng": rng_state(),
            "arch": _jsonable(built.cfg.to_dict()),
            "mim": built.mim_cfg.to_dict() if built.mim_cfg is not None else None,
            "num_classes": built.num_classes,
        }
        write_state(tmp, state, spec.model_dump_json(indent=2))
        uploader = ManifestUploader(epoch, step)
        ray.train.report(
            report,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=name,
            checkpoint_upload_fn=uploader,
        )
    # wait until the controller has committed it: a worker killed before that would otherwise
    # restart from the previous checkpoint although this one is complete in storage
    ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
    )
    retired = retire_old_manifests(root.fs, job, spec.checkpoint.keep_last)
    if writer is not None:
        manifest = uploader.uploaded or {}
        writer.log(
            {
                "type": "event",
                "event": "checkpoint",
                "step": step,
                "epoch": epoch,
                "name": name,
                "size": manifest.get("size"),
                "sha256": manifest.get("sha256"),
                "upload_s": manifest.get("upload_s"),
                "retired": retired,
            }
        )
        writer.flush()


@torch.no_grad()
def evaluate(model, val_ds, rank, world, device, spec: JobSpec, autocast) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy on the whole validation split."""
    model.eval()
    loader = DataLoader(
        Subset(val_ds, shard_indices(len(val_ds), rank, world)), batch_size=spec.micro_batch
    )
    correct1 = correct5 = loss_sum = n = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with autocast:
            logits = model(images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += float(hits[:, 0].sum())
        correct5 += float(hits.any(dim=1).sum())
        n += len(labels)
    correct1, correct5, loss_sum, n = _all_reduce([correct1, correct5, loss_sum, n], device)
    model.train()
    return {
        "val_top1": 100.0 * correct1 / n,
        "val_top5": 100.0 * correct5 / n,
        "val_loss": loss_sum / n,
    }


@torch.no_grad()
def evaluate_mim(model, val_ds, rank, world, device, spec: JobSpec, autocast) -> float:
    """MIM loss on the validation split with fixed masks (the same every epoch)."""
    model.eval()
    gen = torch.Generator().manual_seed(_seed(spec.train.seed, rank, 6))
    loader = DataLoader(
        Subset(val_ds, shard_indices(len(val_ds), rank, world)), batch_size=spec.micro_batch
    )
    loss_sum = n = 0.0
    for images, _ in loader:
        images = images.to(device)
        with autocast:
            loss, _, _ = model(images, model.random_mask(images.shape[0], generator=gen))
        loss_sum += float(loss) * len(images)
        n += len(images)
    loss_sum, n = _all_reduce([loss_sum, n], device)
    model.train()
    return loss_sum / max(n, 1.0)


def _finish(spec, built, val_ds, device, fs, job, step, writer) -> None:
    extra = {"job_kind": spec.kind, "step": step}
    if built.mim_cfg is not None:
        extra["mim"] = built.mim_cfg.to_dict()
    export_model(fs, job, built.encoder, built.cfg, built.num_classes, extra)
    previews: list[str] = []
    if spec.kind == "pretrain" and len(val_ds):
        k = min(NUM_PREVIEWS, len(val_ds))
        images = torch.stack([val_ds[i][0] for i in range(k)]).to(device)
        gen = torch.Generator().manual_seed(_seed(spec.train.seed, 7))
        mask = built.module.random_mask(k, generator=gen)
        previews = write_previews(fs, job, preview_strips(built.module, images, mask))
    writer.log(
        {
            "type": "event",
            "event": "end",
            "step": step,
            "epoch": spec.train.epochs,
            "previews": len(previews),
        }
    )
    writer.flush()


def _store_logs(fs, job: str, attempt: int, logs: _LogBuffer) -> None:
    buf = io.StringIO()
    buf.write("\n".join(logs.lines) + "\n")
    write_bytes(fs, f"{job}/{LOGS}/rank0-attempt{attempt:04d}.log", buf.getvalue().encode())
