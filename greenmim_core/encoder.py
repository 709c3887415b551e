"""The encoder contract GreenMIM and the workers rely on, as a common base of the timm models.

``GreenSwin(GreenEncoder, SwinTransformer)`` and ``GreenTwins(GreenEncoder, Twins)``: the base
comes first in the MRO but defines no parameters and none of timm's methods, so state dicts
and dense forwards stay timm's. It holds what every Green encoder shares (mask-unit checks) and
declares the rest:

* ``cfg`` (frozen config with ``timm_arch``, ``model_args()``), ``img_size``, ``final_stride``,
  ``num_features``;
* ``plan(mask)``: everything the visible forward needs, computable ahead (data-loader workers);
* ``forward_visible(images, mask, plan) -> (B, N_vis, C)`` row-major in final-stage coordinates;
* timm's ``forward_features``, ``forward_head`` and ``reset_classifier`` for dense use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .masking import mask_unit_grid


class StageGeometry:
    """What a hierarchical encoder's config derives from ``img_size``, ``patch_size`` and
    ``depths`` (each stage halves the grid); mixed into ``SwinConfig`` and ``TwinsConfig``."""

    img_size: int
    patch_size: int
    depths: tuple[int, ...]

    @property
    def final_stride(self) -> int:
        return self.patch_size * 2 ** (len(self.depths) - 1)

    @property
    def stage_grids(self) -> list[int]:
        return [self.img_size // (self.patch_size << i) for i in range(len(self.depths))]


class GreenEncoder(nn.Module):
    cfg: Any
    img_size: int
    final_stride: int
    num_features: int

    def mask_grid(self, mask_unit: int) -> tuple[int, int]:
        """Grid of mask units for ``mask_unit`` pixels; validates the unit against the stride."""
        return mask_unit_grid(self.img_size, self.final_stride, mask_unit)

    def plan(self, mask: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def forward_visible(
        self, images: torch.Tensor, mask: torch.Tensor, plan: Any = None, **kwargs: Any
    ) -> Any:
        raise NotImplementedError

    if TYPE_CHECKING:  # provided by the timm model that follows in the MRO

        def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

        def reset_classifier(self, num_classes: int, *args: Any, **kwargs: Any) -> None: ...
