"""Per-epoch evaluation on the validation split, sharded over the workers and summed."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .data import derive_seed, shard_indices
from .spec import JobSpec


def all_reduce(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over the workers (identity outside a process group)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
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
def evaluate_mim(model, val_ds, rank, world, device, spec: JobSpec, autocast) -> float:
    """MIM loss on the validation split with fixed masks (the same every epoch)."""
    model.eval()
    gen = torch.Generator().manual_seed(derive_seed(spec.train.seed, rank, 6))
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
    loss_sum, n = all_reduce([loss_sum, n], device)
    model.train()
    return loss_sum / max(n, 1.0)
