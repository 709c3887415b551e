"""Batches that carry their masks and encoder plans, made in the data-loader processes.

For pretraining, the collate function of the loader draws each batch's masks and plans them
(``greenmim_core.planner.MaskPlanner``), in the loader's worker processes when
``data.loader_workers > 0``. With ``pin_memory`` the loader then pins the whole ``Batch``
(images, masks, plan index tensors), and the training thread only starts asynchronous copies
(``Batch.to``): planning never delays a step.

Determinism: the masks of the ``n``-th batch an epoch gives a rank are drawn from a generator
seeded with ``derive_seed(epoch_seed, n)``, ``epoch_seed`` being derived from (seed, epoch,
rank) by the caller (``SeededBatches.set_seed``), and the augmentation of image ``i`` in it
from ``derive_seed(batch seed, i)``. Neither depends on how many loader processes there are,
which of them made the batch, or whether they persist across epochs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import BatchSampler, Dataset, Sampler, default_collate

from greenmim_core.planner import MaskPlanner
from greenmim_core.swin import EncoderPlan

from .data import derive_seed


@dataclass(frozen=True)
class Batch:
    """images (B, 3, H, W), labels (B,), and for pretraining mask (B, Hu, Wu) bool
    (True = masked) with its ``EncoderPlan``."""

    images: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None = None
    plan: EncoderPlan | None = None
    skipped: tuple[str, ...] = ()  # unreadable images left out of this batch: names, reasons
    num_skipped: int = 0

    def _map(self, fn, plan_fn) -> Batch:
        return replace(
            self,
            images=fn(self.images),
            labels=fn(self.labels),
            mask=None if self.mask is None else fn(self.mask),
            plan=None if self.plan is None else plan_fn(self.plan),
        )

    def pin_memory(self) -> Batch:
        """Page-locked copy; DataLoader's pin-memory thread calls this."""
        return self._map(lambda t: t.pin_memory(), lambda p: p.pin_memory())

    def to(self, device: torch.device) -> Batch:
        """Asynchronous copies to ``device`` (when the batch is pinned)."""
        return self._map(lambda t: t.to(device, non_blocking=True), lambda p: p.to(device))


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """``BatchSampler`` over ``sampler`` whose items are ``(index, seed of the batch)``.

    ``set_seed(s)`` before each pass: batch ``n`` of the pass gets seed ``derive_seed(s, n)``.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, seed: int = 0):
        self.batches = BatchSampler(sampler, batch_size, drop_last)
        self.seed = seed

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        base = self.seed
        for n, indices in enumerate(self.batches):
            key = derive_seed(base, n)
            yield [(i, key) for i in indices]

    def __len__(self) -> int:
        return len(self.batches)


class SeededDataset(Dataset):
    """``ds[(i, seed)] == (*dataset[i], seed, skipped names, skipped count)``: passes the batch
    seed and the images the dataset skipped on to the collate; the sample's random
    augmentation (torch's global RNG) is seeded from (seed, i), leaving the process's own RNG
    state as it was."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset) if isinstance(self.dataset, Sized) else 0

    def __getitem__(self, item: tuple[int, int]) -> tuple[Any, ...]:
        i, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, i))
            sample = self.dataset[i]
        skips = getattr(self.dataset, "skips", None)
        names, count = skips.drain() if skips is not None else ((), 0)
        return (*sample, seed, names, count)


class PlanningCollate:
    """``collate(samples) -> Batch``; with a ``MaskPlanner``, masks and plan included.

    Picklable (only frozen configs inside), so it runs in the loader's worker processes.
    """

    def __init__(self, planner: MaskPlanner | None = None):
        self.planner = planner

    def __call__(self, samples: list[tuple[Any, ...]]) -> Batch:
        images, labels = default_collate([s[:2] for s in samples])
        names = tuple(n for s in samples if len(s) > 3 for n in s[3])
        count = sum(s[4] for s in samples if len(s) > 4)
        if self.planner is None:
            return Batch(images, labels, skipped=names, num_skipped=count)
        generator = torch.Generator().manual_seed(int(samples[0][2]))
        mask, plan = self.planner(len(samples), generator)
        return Batch(images, labels, mask, plan, names, count)
