"""Per-epoch evaluation on the validation split, sharded over the workers and summed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, SequentialSampler, Subset

from greenmim_core.planner import MaskPlanner

from .batching import PlanningCollate, SeededBatches, SeededDataset
from .data import derive_seed, shard_indices
from .spec import JobSpec


def all_reduce(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Sum ``values`` (floats or 0-d tensors) over the workers; one host sync in all."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


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
    correct1, correct5, loss_sum, n = all_reduce([correct1, correct5, loss_sum, n], device)
    model.train()
    return {
        "val_top1": 100.0 * correct1 / n,
        "val_top5": 100.0 * correct5 / n,
        "val_loss": loss_sum / n,
    }


@torch.no_grad()
def evaluate_mim(model, val_ds, rank, world, device, spec: JobSpec, autocast) -> dict[str, float]:
    """MIM loss on the validation split with fixed masks (the same every epoch), and the spread
    of the dense encoder's pooled features over the images (mean over channels of their std).

    A feature spread near 0 means the encoder collapsed to a constant output (the decoder then
    reconstructs from positions alone) and its weights are useless for fine-tuning; on small
    datasets this happens when the learning rate is too high."""
    model.eval()
    shard = SeededDataset(Subset(val_ds, shard_indices(len(val_ds), rank, world)))
    # masks and plans made by the loader, as in training, with seeds fixed across epochs
    batches = SeededBatches(
        SequentialSampler(shard), spec.micro_batch, drop_last=False,
        seed=derive_seed(spec.train.seed, rank, 6),
    )  # fmt: skip
    loader = DataLoader(
        shard,
        batch_sampler=batches,
        collate_fn=PlanningCollate(MaskPlanner(model.encoder.cfg, model.cfg)),
        num_workers=spec.data.loader_workers,
        pin_memory=device.type == "cuda",
    )
    loss_sum = n = torch.zeros((), dtype=torch.float64, device=device)
    s1 = s2 = torch.zeros(model.encoder.num_features, dtype=torch.float64, device=device)
    for batch in loader:
        batch = batch.to(device)
        images = batch.images
        with autocast:
            loss, _, _ = model(images, batch.mask, batch.plan)
            # (B, C) dense, as fine-tuning sees it
            pooled = model.encoder(images).mean(dim=1).double()
        loss_sum = loss_sum + loss.detach().double() * len(images)  # no host sync per batch
        n = n + len(images)
        s1, s2 = s1 + pooled.sum(0), s2 + pooled.pow(2).sum(0)
    stats = torch.cat([torch.stack([loss_sum, n]), s1, s2])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    total, count = float(stats[0]), max(float(stats[1]), 1.0)
    c = s1.numel()
    mean, sq = stats[2 : 2 + c] / count, stats[2 + c :] / count
    model.train()
    return {
        "val_loss": total / count,
        "val_feature_std": float((sq - mean.pow(2)).clamp_min(0).sqrt().mean()),
    }
