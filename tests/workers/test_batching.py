"""Masks and encoder plans made by the data loader's collate (worker processes included)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler

import greenmim_core as gc
from greenmim_core.mim import GreenMIM, MIMConfig
from greenmim_core.planner import MaskPlanner
from workers.batching import Batch, PlanningCollate, SeededBatches, SeededDataset
from workers.data import derive_seed

pytestmark = pytest.mark.unit

MICRO = "swin_micro_patch2_window4_64"
MIM = MIMConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4)


class Images(Dataset):
    """Fixed random images, label = index."""

    def __init__(self, n: int):
        self.images = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


def loader(ds, seed: int, workers: int, batch: int = 4, persistent: bool = False):
    batches = SeededBatches(SequentialSampler(ds), batch, drop_last=True, seed=seed)
    planner = MaskPlanner(gc.get_config(MICRO), MIM)
    return batches, DataLoader(
        SeededDataset(ds),
        batch_sampler=batches,
        collate_fn=PlanningCollate(planner),
        num_workers=workers,
        persistent_workers=persistent,
    )


def plan_tensors(plan):
    out = []
    for s in plan.stages:
        out += [s.coords] + ([] if s.merge is None else [s.merge])
        for p in s.block_plans:
            out += [p.gather, p.scatter, p.slot_window, p.slot_hw]
    return out


def assert_same_plan(a, b):
    assert a.batch == b.batch and len(a.stages) == len(b.stages)
    for sa, sb in zip(a.stages, b.stages, strict=True):
        assert [(p.group_size, p.num_groups) for p in sa.block_plans] == [
            (p.group_size, p.num_groups) for p in sb.block_plans
        ]
    for x, y in zip(plan_tensors(a), plan_tensors(b), strict=True):
        assert torch.equal(x, y)


def test_plan_from_a_loader_process_equals_the_models_own_and_gives_the_same_loss():
    ds = Images(8)
    _, dl = loader(ds, seed=123, workers=1)
    batches = list(dl)  # made in a DataLoader worker process
    torch.manual_seed(0)
    model = GreenMIM(gc.create_model(MICRO), MIM)
    for n, batch in enumerate(batches):
        assert isinstance(batch, Batch) and batch.plan is not None and batch.mask is not None
        assert torch.equal(batch.labels, torch.arange(4 * n, 4 * n + 4))
        # the same masks, drawn and planned in this process
        gen = torch.Generator().manual_seed(derive_seed(123, n))
        mask = model.random_mask(4, generator=gen)
        assert torch.equal(batch.mask, mask)
        assert_same_plan(batch.plan, model.encoder.plan(mask))
        with torch.no_grad():
            premade = model(batch.images, batch.mask, batch.plan)[0]
            inline = model(batch.images, mask)[0]
        assert torch.equal(premade, inline)


def test_masks_are_deterministic_per_seed_epoch_rank_and_batch():
    ds = Images(12)

    def epoch_masks(seed, epoch, rank, workers):
        batches, dl = loader(ds, seed=0, workers=workers)
        batches.set_seed(derive_seed(seed, epoch, rank, 5))  # as WorkerRun does per epoch
        return [b.mask for b in dl]

    first = epoch_masks(0, 1, 0, workers=0)
    assert len(first) == 3
    # same (seed, epoch, rank): the same masks, whether made in 0 or 2 loader processes
    for again in (epoch_masks(0, 1, 0, workers=0), epoch_masks(0, 1, 0, workers=2)):
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # batches of one epoch differ from each other; another epoch, rank or seed changes them
    assert not torch.equal(first[0], first[1])
    for other in (epoch_masks(0, 2, 0, 0), epoch_masks(0, 1, 1, 0), epoch_masks(1, 1, 0, 0)):
        assert all(not torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_finetune_batches_carry_no_plan():
    ds = Images(4)
    dl = DataLoader(
        SeededDataset(ds),
        batch_sampler=SeededBatches(SequentialSampler(ds), 2, drop_last=False),
        collate_fn=PlanningCollate(None),
    )
    batch = next(iter(dl))
    assert batch.mask is None and batch.plan is None
    assert torch.equal(batch.images, ds.images[:2])
    assert batch.to(torch.device("cpu")).images.shape == (2, 3, 64, 64)


class Augmented(Images):
    """Adds noise from torch's global RNG, as random crops and flips draw from it."""

    def __getitem__(self, i: int):
        return self.images[i] + torch.rand(()), i


def test_augmentations_do_not_depend_on_loader_processes():
    ds = Augmented(8)

    def epoch_images(epoch_seed, workers, dl_and_batches=None):
        batches, dl = dl_and_batches or loader(ds, seed=0, workers=workers)
        batches.set_seed(epoch_seed)
        return [b.images for b in dl]

    inline = epoch_images(1, 0)
    persistent = loader(ds, seed=0, workers=2, persistent=True)
    for seed in (1, 2, 1):  # the same workers across "epochs"
        again = epoch_images(seed, 2, persistent)
        same = all(torch.equal(a, b) for a, b in zip(inline, again, strict=True))
        assert same == (seed == 1)
