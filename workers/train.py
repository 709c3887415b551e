"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on every worker.

One optimiser step ("step") consumes ``global_batch_size`` images: each of the ``W`` workers
runs ``accum_steps`` micro-batches of ``micro_batch`` images, gradients are all-reduced by DDP
on the last micro-batch only. The step counter counts optimiser steps since the job began
and is stored in every checkpoint, so a resumed attempt continues it.

Determinism: before each epoch, data order and the rest are reseeded from (seed, epoch,
rank); each batch's masks and augmentations from (seed, epoch, rank, batch) (``batching.py``).
Masks and encoder plans are made with the batch by the loader's collate, in its worker
processes, and reach the step in pinned memory. Checkpoints are taken at epoch ends, so a
resumed run sees the same batches and masks as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import socket
import tempfile
import time
from typing import Any, cast

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch.nn.parallel import DistributedDataParallel as DDP

from greenmim_core.mim import GreenMIM, MIMConfig
from greenmim_core.planner import MaskPlanner

from .artifacts import MetricsWriter
from .batching import Batch
from .checkpointing import (
    ManifestUploader,
    agreed_resume,
    checkpoint_name,
    committed_paths,
    read_state,
    retire_old_manifests,
    set_rng_state,
    training_state,
    write_state,
)
from .data import derive_seed
from .evaluate import all_reduce, evaluate, evaluate_mim
from .export import export_model, pretrain_previews
from .feed import StepFeed, build_train_data
from .images import DataError, record_data_error
from .model import (
    build_module,
    compile_blocks,
    create_optimizer,
    create_scheduler,
    load_initial_encoder,
    resolve_init_from,
    resolved_precision,
    unwrap,
)
from .sources import open_source
from .spec import JobSpec
from .storage import S3Settings, open_root
from .worker_state import (
    LogBuffer,
    WorkerConfig,
    check_compatible,
    peak_memory_mb,
    store_logs,
)

logger = logging.getLogger(__name__)

NUM_PREVIEWS = 4
_SOFT_CE = SoftTargetCrossEntropy()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: run (or resume) the job described by ``config`` (a ``WorkerConfig``)."""
    WorkerRun(WorkerConfig(**config)).run()


class WorkerRun:
    """One training worker: data shard, model, optimiser, metrics (rank 0) and checkpoints."""

    def __init__(self, wc: WorkerConfig):
        self.wc = wc
        self.spec = spec = JobSpec.model_validate(wc.spec)
        self.s3 = S3Settings(**wc.s3) if wc.s3 else None
        self.root = open_root(wc.storage_root, self.s3)
        self.job = self.root.job_prefix(wc.tenant, wc.job_id)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.is_main = self.rank == 0
        self.logs = LogBuffer()
        self.writer: MetricsWriter | None = None
        self.autocast = torch.autocast(
            self.device.type,
            dtype=torch.bfloat16,
            enabled=resolved_precision(spec.train.precision, self.device) == "bf16",
        )

    # --- setup

    def _seed_process(self) -> None:
        torch.set_num_threads(max(1, int(self.spec.resources.cpus_per_worker)))
        seed = self.spec.train.seed
        torch.manual_seed(derive_seed(seed, self.rank))
        np.random.seed(derive_seed(seed, self.rank, 1) % 2**32)
        random.seed(derive_seed(seed, self.rank, 2))

    def _setup_data(self) -> None:
        spec = self.spec
        uri = self.wc.read_policy().check(spec.data.uri, "data.uri")
        self.source = open_source(spec.data.model_copy(update={"uri": uri}), self.s3)
        self.steps_per_epoch = self.source.steps_per_epoch(spec)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.source.num_train} training images cannot fill one step of "
                f"{spec.train.global_batch_size} images"
            )
        self.planner = None
        if spec.kind == "pretrain":
            assert spec.mim is not None  # guaranteed by JobSpec validation
            self.planner = MaskPlanner(spec.arch_config(), MIMConfig(**spec.mim.config_kwargs()))
            self.planner.model()  # built before the loader forks its processes
        self.data = build_train_data(
            spec, self.source, self.rank, self.world, self.planner, self.device, self.s3
        )
        self.train_loader, self.val_ds = self.data.loader, self.data.val_ds
        self.feed = StepFeed(spec.data.max_skipped_images, self.rank, self.device)

    def _setup_model(self) -> tuple[int, int, dict[str, Any] | None]:
        """Build everything; restore the latest checkpoint or load initial weights.

        Returns (epochs done, steps done, initial-weights summary)."""
        spec = self.spec
        num_classes = 0
        if spec.finetune is not None:
            num_classes = spec.finetune.num_classes or self.source.num_classes
        self.built = built = build_module(spec, num_classes)
        built.module.to(self.device)  # before the optimiser: fused AdamW wants its params there
        if spec.train.compile:
            compile_blocks(built.encoder)
        self.optimizer = create_optimizer(spec, built, self.device)
        self.scheduler = create_scheduler(spec, self.optimizer, self.steps_per_epoch)
        epoch, step, init = 0, 0, None
        # the newest listed checkpoint, which may be newer than Ray's (checkpointing.py)
        checkpoint, self.ray_checkpoint = agreed_resume(self.root.fs, self.job, self.world)
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = read_state(d)
            check_compatible(state, spec, built)
            built.module.load_state_dict(state["model"], strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            epoch, step = int(state["epoch"]), int(state["step"])
            logger.info(
                "rank %d resumed from %s: epoch %d, step %d",
                self.rank,
                checkpoint.path,
                epoch,
                step,
            )
        elif spec.finetune is not None and spec.finetune.init_from not in (None, "scratch"):
            fs, path = resolve_init_from(
                spec.finetune.init_from, self.root, self.wc.tenant, self.s3, self.wc.read_policy()
            )
            init = load_initial_encoder(built.encoder, fs, path)
        self.scheduler.step_update(num_updates=step)
        self.model = ray.train.torch.prepare_model(built.module)
        self.params = [p for p in built.module.parameters() if p.requires_grad]
        self.mixup = None
        ft = spec.finetune
        if ft is not None and (ft.mixup > 0 or ft.cutmix > 0):
            self.mixup = Mixup(
                mixup_alpha=ft.mixup,
                cutmix_alpha=ft.cutmix,
                prob=ft.mixup_prob,
                label_smoothing=ft.label_smoothing,
                num_classes=num_classes,
            )
        return epoch, step, init

    def _start_metrics(self, epoch: int, step: int, init: dict[str, Any] | None) -> None:
        logging.getLogger("workers").addHandler(self.logs)
        logging.getLogger("workers").setLevel(logging.INFO)
        self.writer = MetricsWriter(self.root.fs, self.job, flush_every_s=self.wc.metrics_flush_s)
        attempt = self.writer.begin(resume_step=step)
        self.writer.log(
            {
                "type": "event",
                "event": "resume" if step else "start",
                "step": step,
                "epoch": epoch,
                "attempt": attempt,
                "world_size": self.world,
                "steps_per_epoch": self.steps_per_epoch,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "device": str(self.device),
                "init": init,
                "ray_checkpoint": self.ray_checkpoint,  # Ray's own choice (may be older)
            }
        )
        self.writer.flush()
        spec = self.spec
        logger.info(
            "%s %s: %d train / %d val images, %d steps/epoch x %d epochs, %d workers x %d micro x %d accum",
            spec.kind, spec.model, self.source.num_train, self.source.num_val, self.steps_per_epoch,
            spec.train.epochs, self.world, spec.micro_batch, spec.accum_steps,
        )  # fmt: skip

    # --- training

    def run(self) -> None:
        self._seed_process()
        self._setup_data()
        start_epoch, step, init = self._setup_model()
        if self.is_main:
            self._start_metrics(start_epoch, step, init)
        try:
            for epoch in range(start_epoch, self.spec.train.epochs):
                step, train_loss = self._train_epoch(epoch, step)
                self._end_epoch(epoch + 1, step, train_loss)
            if self.is_main:
                self._finish(step)
        except DataError as e:  # every worker gets here at the same step (feed.py)
            logger.error("rank %d stops: %s", self.rank, e)
            record_data_error(self.root.fs, self.job, self.rank, e)
            if self.writer is not None:
                self.writer.flush()
                store_logs(self.root.fs, self.job, self.writer.attempt, self.logs)
        finally:
            if self.is_main:
                logging.getLogger("workers").removeHandler(self.logs)

    def _loss(self, batch: Batch) -> torch.Tensor:
        model, ft = self.model, self.spec.finetune
        images, labels = batch.images, batch.labels
        if ft is None:  # pretrain: masks and plan came with the batch
            return model(images, batch.mask, batch.plan)[0]
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
            return _SOFT_CE(model(images).float(), targets)
        return F.cross_entropy(model(images).float(), labels, label_smoothing=ft.label_smoothing)

    def _train_epoch(self, epoch: int, step: int) -> tuple[int, float]:
        spec, seed, rank = self.spec, self.spec.train.seed, self.rank
        self.data.begin_epoch(seed, epoch, rank)
        self.feed.begin_epoch()
        torch.manual_seed(derive_seed(seed, epoch, rank, 4))
        self.model.train()
        accum, max_norm = spec.accum_steps, spec.train.grad_clip or math.inf
        losses = []
        batches = iter(self.train_loader)
        for i in range(self.steps_per_epoch):
            t0 = time.perf_counter()
            step_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            for micro, batch in enumerate(self.feed.step(batches, accum)):
                batch = batch.to(self.device)
                # gradients are all-reduced on the last micro-batch only
                sync = micro == accum - 1 or self.world == 1
                no_sync = contextlib.nullcontext() if sync else cast(DDP, self.model).no_sync()
                with no_sync, self.autocast:
                    loss = self._loss(batch)
                    (loss / accum).backward()
                step_loss += loss.detach().double() / accum  # no host sync per micro-batch
            grad_norm_t = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            lr = max(g["lr"] for g in self.optimizer.param_groups)  # the lr this step used
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            self.scheduler.step_update(num_updates=step)
            # the step's one host sync; every rank has the same gradient norm after DDP
            loss_sum, n, norm_sum = all_reduce([step_loss, 1.0, grad_norm_t], self.device)
            grad_norm = norm_sum / n
            losses.append(loss_sum / n)
            dt = time.perf_counter() - t0
            if self.writer is not None:
                self.writer.log(
                    {
                        "type": "step",
                        "step": step,
                        "epoch": epoch,
                        "loss": losses[-1],
                        "lr": lr,
                        "images_per_s": spec.train.global_batch_size / dt,
                        "images_per_s_per_worker": spec.per_worker_batch / dt,
                        "step_time_s": dt,
                        "grad_norm": grad_norm,
                        "peak_memory_mb": peak_memory_mb(self.device),
                        "skipped_images": self.feed.skipped,
                    },
                    hold=i == self.steps_per_epoch - 1,  # the epoch record joins it
                )
        return step, sum(losses) / max(len(losses), 1)

    def _end_epoch(self, done: int, step: int, train_loss: float) -> None:
        spec = self.spec
        metrics: dict[str, Any] = {"train_loss": train_loss}
        if len(self.val_ds):
            args = (
                unwrap(self.model),
                self.val_ds,
                self.rank,
                self.world,
                self.device,
                spec,
                self.autocast,
            )
            if spec.kind == "finetune":
                metrics.update(evaluate(*args))
            else:
                metrics.update(evaluate_mim(*args))
        if self.writer is not None and spec.kind == "pretrain":
            self._previews(done)
        if self.writer is not None:
            self.writer.log({"type": "epoch", "step": step, "epoch": done, **metrics}, hold=True)
            self.writer.flush()
            logger.info("epoch %d/%d step %d: %s", done, spec.train.epochs, step, metrics)
        if done % spec.checkpoint.every_epochs == 0 or done == spec.train.epochs:
            self._checkpoint(done, step, metrics)
        if self.writer is not None:
            store_logs(self.root.fs, self.job, self.writer.attempt, self.logs)

    def _checkpoint(self, epoch: int, step: int, metrics: dict[str, Any]) -> None:
        """All ranks call ``ray.train.report``; rank 0 attaches the checkpoint."""
        name = checkpoint_name(epoch)
        report = {"epoch": epoch, "step": step, **metrics}
        if not self.is_main:
            ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)
            return
        built, spec = self.built, self.spec
        with tempfile.TemporaryDirectory(prefix="greenmim-ckpt-") as tmp:
            state = training_state(spec.kind, epoch, step, built, self.optimizer, self.scheduler)
            write_state(tmp, state, spec.model_dump_json(indent=2))
            uploader = ManifestUploader(epoch, step, self.s3)
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
                checkpoint_upload_fn=uploader,
            )
        # once Ray has committed it, retire what is past keep_last and what Ray does not track
        tracked = committed_paths()
        retired = retire_old_manifests(self.root.fs, self.job, spec.checkpoint.keep_last, tracked)
        manifest = uploader.uploaded or {}
        assert self.writer is not None
        upload = {k: manifest.get(k) for k in ("size", "sha256", "upload_s")}
        event = {"type": "event", "event": "checkpoint", "step": step, "epoch": epoch}
        self.writer.log({**event, "name": name, **upload, "retired": retired})
        self.writer.flush()

    def _previews(self, epoch: int | None) -> list[str]:
        """Rank 0, pretraining: the same images under the same mask after each epoch and at
        the end, so the previews show the reconstruction improve."""
        if not (k := min(NUM_PREVIEWS, len(self.val_ds))):
            return []
        images = torch.stack([self.val_ds[i][0] for i in range(k)]).to(self.device)
        mim, seed = cast(GreenMIM, self.built.module), derive_seed(self.spec.train.seed, 7)
        return pretrain_previews(self.root.fs, self.job, mim, images, seed, epoch)

    def _finish(self, step: int) -> None:
        """Rank 0: timm-layout export, previews, the end record."""
        spec, built, fs = self.spec, self.built, self.root.fs
        extra: dict[str, Any] = {"job_kind": spec.kind, "step": step}
        if built.mim_cfg is not None:
            extra["mim"] = built.mim_cfg.to_dict()
        export_model(fs, self.job, built.encoder, built.cfg, built.num_classes, extra)
        previews = self._previews(None) if spec.kind == "pretrain" else []
        assert self.writer is not None
        end = {"type": "event", "event": "end", "step": step, "epoch": spec.train.epochs}
        self.writer.log({**end, "previews": len(previews)})
        self.writer.flush()
        store_logs(fs, self.job, self.writer.attempt, self.logs)
