"""Random masking in mask units.

Convention, stated once for the whole package: a mask is a bool tensor of shape
``(B, H/unit, W/unit)`` over mask units, **True = masked (removed)**, False = visible (kept).

Every sample keeps the same number of visible units, so visible tokens stack into a dense
``(B, N_vis, C)`` tensor at every stage.
"""

from __future__ import annotations

import torch


def num_masked_units(num_units: int, ratio: float) -> int:
    """How many of ``num_units`` a ``ratio`` masks; at least one unit stays visible and one masked."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    n = int(round(ratio * num_units))
    if not 0 < n < num_units:
        raise ValueError(
            f"mask ratio {ratio} masks {n} of {num_units} mask units; "
            "at least one unit must stay visible and one be masked"
        )
    return n


def random_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float,
    per_sample: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform random mask over a ``grid`` of mask units; (B, Hu, Wu) bool, True = masked.

    ``per_sample=False`` draws one mask and shares it across the batch.
    """
    hu, wu = grid
    n_masked = num_masked_units(hu * wu, ratio)
    rows = batch if per_sample else 1
    noise = torch.rand(rows, hu * wu, generator=generator, device=device)
    rank = noise.argsort(dim=1).argsort(dim=1)  # rank of each unit's noise
    mask = (rank < n_masked).view(rows, hu, wu)
    return mask.expand(batch, hu, wu).clone() if not per_sample else mask


def upsample_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, Hu, Wu) -> (B, Hu*scale, Wu*scale): each unit covers a ``scale x scale`` block."""
    if scale == 1:
        return mask
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def mask_unit_grid(img_size: int, final_stride: int, mask_unit: int) -> tuple[int, int]:
    """Grid of mask units of ``mask_unit`` pixels; the unit must be a multiple of the final stride
    so that every downsampling window sees all-visible or all-masked tokens."""
    if mask_unit <= 0 or mask_unit % final_stride:
        raise ValueError(
            f"mask unit {mask_unit} is not a multiple of the encoder's final stride {final_stride}"
        )
    if img_size % mask_unit:
        raise ValueError(f"img_size {img_size} is not divisible by mask unit {mask_unit}")
    n = img_size // mask_unit
    return n, n


def check_mask(mask: torch.Tensor, img_size: int, final_stride: int) -> int:
    """Validate a (B, Hu, Wu) mask for an encoder; returns the mask unit in pixels."""
    B, hu, wu = mask.shape
    if hu != wu or img_size % hu:
        raise ValueError(f"mask grid {hu}x{wu} does not tile img_size {img_size}")
    unit = img_size // hu
    mask_unit_grid(img_size, final_stride, unit)
    visible = (~mask).flatten(1).sum(1)
    if not bool((visible == visible[0]).all()) or int(visible[0]) == 0:
        raise ValueError(
            f"every sample needs the same, nonzero number of visible units, got {visible.tolist()}"
        )
    return unit
