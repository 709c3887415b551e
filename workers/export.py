"""End-of-job outputs: timm-layout weights and, for pretraining, reconstruction previews."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
from PIL import Image
from safetensors.torch import save
from torch import nn

from greenmim_core.checkpoint import export_timm
from greenmim_core.mim import GreenMIM

from .artifacts import MODEL, MODEL_CONFIG
from .data import unnormalize
from .previews import preview_dir
from .storage import write_bytes

logger = logging.getLogger(__name__)


def export_model(
    fs: pafs.FileSystem,
    job_prefix: str,
    encoder: nn.Module,
    cfg: Any,
    num_classes: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model.safetensors`` then ``config.json`` (timm key layout, timm-hub config).

    ``config.json`` goes last, so a reader that finds it also finds the weights."""
    state, config = export_timm(encoder, cfg, num_classes)
    if extra:
        config = {**config, "greenmim": {**config.get("greenmim", {}), **extra}}
    write_bytes(fs, f"{job_prefix}/{MODEL}", save(state, metadata={"format": "pt"}))
    write_bytes(fs, f"{job_prefix}/{MODEL_CONFIG}", json.dumps(config, indent=2).encode())
    logger.info(
        "exported %s (%d tensors, num_classes=%d)", f"{job_prefix}/{MODEL}", len(state), num_classes
    )
    return config


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (img.permute(1, 2, 0).float().numpy() * 255.0).round().astype(np.uint8)


@torch.no_grad()
def preview_strips(
    model: GreenMIM, images: torch.Tensor, mask: torch.Tensor, scale: int = 2
) -> list[bytes]:
    """One PNG per image: original | masked input (masked units grey) | reconstruction.

    ``model`` is a ``GreenMIM``; ``images`` (B, 3, H, W) normalised; ``mask`` (B, Hu, Wu)."""
    model.eval()
    _, pred, _ = model(images, mask)
    recon = model.reconstruction(images, pred, mask)
    unit = images.shape[-1] // mask.shape[-1]  # pixels per mask unit
    pixel_mask = mask.repeat_interleave(unit, 1).repeat_interleave(unit, 2)[:, None]
    original = unnormalize(images)
    masked = torch.where(pixel_mask.to(images.device), torch.full_like(original, 0.5), original)
    out = []
    for a, b, c in zip(original, masked, unnormalize(recon), strict=True):
        gap = torch.ones(3, a.shape[1], 2)
        strip = torch.cat([a.cpu(), gap, b.cpu(), gap, c.cpu()], dim=2)
        img = Image.fromarray(_to_uint8(strip))
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_previews(
    fs: pafs.FileSystem, job_prefix: str, pngs: list[bytes], epoch: int | None = None
) -> list[str]:
    paths = []
    for i, png in enumerate(pngs):
        path = f"{preview_dir(job_prefix, epoch)}/sample_{i:02d}.png"
        write_bytes(fs, path, png)
        paths.append(path)
    return paths


def pretrain_previews(
    fs: pafs.FileSystem,
    job_prefix: str,
    mim: GreenMIM,
    images: torch.Tensor,
    seed: int,
    epoch: int | None = None,
) -> list[str]:
    """Previews of ``images`` under a mask drawn from ``seed``; the paths written (after
    ``epoch`` epochs, or the end-of-job ones)."""
    mask = mim.random_mask(len(images), generator=torch.Generator().manual_seed(seed))
    return write_previews(fs, job_prefix, preview_strips(mim, images, mask), epoch)
