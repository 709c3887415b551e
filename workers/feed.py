"""What feeds a training worker: its loader over the dataset (an ImageFolder through a
``DistributedSampler``, or its shards through a ``ShardStream``), the validation set, and the
per-step hand-over of micro-batches that counts skipped images over all workers.

Every step begins with one small all-reduce of (images skipped on this worker since the last
step, whether this worker's loader ran dry). All workers thus see the same totals at the same
step and stop together with a ``DataError`` (over ``data.max_skipped_images``, or a shard
shorter than its index), instead of one worker failing while the others wait in a collective.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from .batching import Batch, PlanningCollate, SeededBatches, SeededDataset
from .data import ImageFolderDataset, derive_seed, eval_transform, seed_worker, train_transform
from .evaluate import all_reduce
from .images import DataError, SkipBudget
from .shards import ShardMembers, ShardStream
from .sources import DataSource
from .spec import JobSpec
from .storage import S3Settings

logger = logging.getLogger(__name__)


@dataclass
class TrainData:
    """A worker's training loader and validation set; ``begin_epoch`` reseeds them."""

    loader: DataLoader
    val_ds: ImageFolderDataset | ShardMembers
    sampler: DistributedSampler | None
    batches: SeededBatches | None
    stream: ShardStream | None
    loader_gen: torch.Generator

    def begin_epoch(self, seed: int, epoch: int, rank: int) -> None:
        """Reseed everything of the epoch from (seed, epoch, rank)."""
        self.loader_gen.manual_seed(derive_seed(seed, epoch, rank, 3))
        if self.sampler is not None and self.batches is not None:
            self.sampler.set_epoch(epoch)
            self.batches.set_seed(derive_seed(seed, epoch, rank, 5))
        if self.stream is not None:
            self.stream.set_epoch(derive_seed(seed, epoch, rank, 5))


def build_train_data(
    spec: JobSpec,
    source: DataSource,
    rank: int,
    world: int,
    planner: Any,
    device: torch.device,
    s3: S3Settings | None,
) -> TrainData:
    img_size = spec.arch_config().img_size
    loaders = spec.data.loader_workers
    collate = PlanningCollate(planner)
    gen = torch.Generator()
    common: dict[str, Any] = {
        "num_workers": loaders,
        "worker_init_fn": seed_worker,
        "generator": gen,
        "pin_memory": device.type == "cuda",
    }
    if source.index is not None:
        stream = ShardStream(
            source.fs_uri,
            source.index.train,
            rank,
            world,
            loaders,
            spec.micro_batch,
            train_transform(img_size, spec.data),
            collate,
            spec.data.shuffle_buffer,
            s3,
        )
        # processes restart each epoch, so they start from the epoch's seed (shards.py)
        loader = DataLoader(stream, batch_size=None, persistent_workers=False, **common)
        val = ShardMembers(source.fs_uri, source.index.val, eval_transform(img_size), s3)
        return TrainData(loader, val, None, None, stream, gen)
    assert source.folder is not None
    splits = source.folder
    train_ds = ImageFolderDataset(
        splits.fs_uri, splits.train, train_transform(img_size, spec.data), s3
    )
    sampler: DistributedSampler = DistributedSampler(
        train_ds, world, rank, shuffle=True, seed=spec.train.seed, drop_last=True
    )
    batches = SeededBatches(sampler, spec.micro_batch, drop_last=True)
    loader = DataLoader(
        SeededDataset(train_ds),
        batch_sampler=batches,
        collate_fn=collate,
        # no restart stall at each epoch; determinism does not depend on it (batching.py)
        persistent_workers=loaders > 0,
        **common,
    )
    val_ds = ImageFolderDataset(splits.fs_uri, splits.val, eval_transform(img_size), s3)
    return TrainData(loader, val_ds, sampler, batches, None, gen)


class StepFeed:
    """Hands out each step's micro-batches and keeps the skipped-image count of the run."""

    def __init__(self, limit: int, rank: int, device: torch.device):
        self.budget = SkipBudget(limit)
        self.rank, self.device = rank, device

    @property
    def skipped(self) -> int:
        """Images skipped so far in this epoch, all workers."""
        return self.budget.total

    def begin_epoch(self) -> None:
        """The limit is per epoch: each image is drawn once an epoch, skipped or not."""
        self.budget = SkipBudget(self.budget.limit)

    def step(self, batches: Iterator[Batch], accum: int) -> list[Batch]:
        got: list[Batch] = []
        names: list[str] = []
        local, dry = 0, 0
        try:
            while len(got) < accum:
                b = next(batches)
                names += b.skipped
                local += b.num_skipped
                if len(b.images):
                    got.append(b)
        except StopIteration:
            dry = 1
        skipped, dry_workers = all_reduce([local, dry], self.device)
        if skipped and len(self.budget.first) < self.budget.keep:
            # the names from every worker, so that rank 0's log and the error name them all;
            # all ranks take this branch together (same totals, same list lengths)
            self.budget.note(_gather(names), log=self.rank == 0)
        self.budget.add_global(int(skipped))  # raises DataError over the limit
        if dry_workers:
            named = "; ".join(self.budget.first) or "(none skipped: shards shorter than the index)"
            raise DataError(
                f"{int(dry_workers)} worker(s) ran out of images before the epoch's last step "
                f"(shards shorter than their index, or unreadable): {named}"
            )
        return got


def _gather(names: list[str]) -> list[str]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return names
    parts: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, names)
    return [n for part in parts for n in part or []]
