"""GreenMIM: masked image modeling with a visible-only encoder and a light MAE-style decoder.

``GreenMIM(encoder, cfg)`` takes any encoder meeting the contract of ``encoder.GreenEncoder``
(``img_size``, ``final_stride``, ``num_features``, ``mask_grid(unit)``,
``forward_visible(images, mask) -> (B, N_vis, C)`` row-major in final-stage coordinates).

Masks follow ``masking.py``: (B, Hu, Wu) bool over mask units, True = masked.
The decoder sees one token per final-stage position (visible ones from the encoder, a learned
mask token elsewhere) and predicts its ``stride x stride x 3`` pixels. The loss is the MSE on
pixels normalised per mask unit, over masked units only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.layers import build_sincos2d_pos_embed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from .encoder import GreenEncoder
from .masking import num_masked_units, random_mask, upsample_mask


@dataclass(frozen=True)
class MIMConfig:
    """Masking and decoder settings; ``mask_unit=None`` means the encoder's final stride."""

    mask_ratio: float = 0.75
    mask_unit: int | None = None
    per_sample_mask: bool = True
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_unit is not None and self.mask_unit <= 0:
            raise ValueError(f"mask_unit must be positive, got {self.mask_unit}")
        if self.decoder_depth < 1 or self.decoder_dim < 1:
            raise ValueError(
                f"decoder needs depth >= 1 and dim >= 1, got {self.decoder_depth}, {self.decoder_dim}"
            )
        if self.decoder_heads < 1 or self.decoder_dim % self.decoder_heads:
            raise ValueError(
                f"decoder_dim {self.decoder_dim} is not divisible by decoder_heads {self.decoder_heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GreenMIM(nn.Module):
    """``loss, pred, mask = model(images)``; pred is (B, L, stride*stride*3) over all final tokens."""

    def __init__(self, encoder: GreenEncoder, cfg: MIMConfig = MIMConfig()):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.stride: int = int(encoder.final_stride)
        self.unit: int = cfg.mask_unit or self.stride
        self.mask_grid = encoder.mask_grid(self.unit)  # validates the unit against the encoder
        num_masked_units(self.mask_grid[0] * self.mask_grid[1], cfg.mask_ratio)
        self.grid = encoder.img_size // self.stride  # final-stage tokens per side

        D = cfg.decoder_dim
        self.decoder_embed = nn.Linear(encoder.num_features, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        pos = build_sincos2d_pos_embed([self.grid, self.grid], dim=D)  # (L, D)
        self.register_buffer("decoder_pos_embed", pos.unsqueeze(0), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(D, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                for _ in range(cfg.decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(D)
        self.decoder_pred = nn.Linear(D, self.stride * self.stride * 3)
        trunc_normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def random_mask(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        return random_mask(
            batch, self.mask_grid, self.cfg.mask_ratio, self.cfg.per_sample_mask, generator, device
        )

    def token_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, Hu, Wu) unit mask -> (B, L) mask over final-stage tokens, True = masked."""
        return upsample_mask(mask, self.unit // self.stride).flatten(1)

    def forward_decoder(self, latent: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """latent (B, N_vis, C) + token_mask (B, L) -> pixel predictions (B, L, stride*stride*3)."""
        x = self.decoder_embed(latent)
        B, L = token_mask.shape
        # positions of the visible tokens, row-major: a stable sort puts them (0 = visible)
        # first in order; boolean indexing would do the same but wait for the device
        visible = token_mask.to(torch.uint8).argsort(dim=1, stable=True)[:, : x.shape[1]]
        full = self.mask_token.to(x.dtype).expand(B, L, -1)
        full = full.scatter(1, visible[..., None].expand(-1, -1, x.shape[-1]), x)
        x = self.decoder_blocks(full + self.decoder_pos_embed)
        return self.decoder_pred(self.decoder_norm(x))

    def normalized_images(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images normalised per mask unit (if ``norm_pix_loss``), with the unit mean and std."""
        B, C, H, W = images.shape
        u = self.unit
        x = images.view(B, C, H // u, u, W // u, u)
        if not self.cfg.norm_pix_loss:
            return (
                images,
                torch.zeros_like(x[:, :1, :, :1, :, :1]),
                torch.ones_like(x[:, :1, :, :1, :, :1]),
            )
        mean = x.mean(dim=(1, 3, 5), keepdim=True)
        std = (x.var(dim=(1, 3, 5), keepdim=True) + 1e-6).sqrt()
        return ((x - mean) / std).view(B, C, H, W), mean, std

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, L, stride*stride*3), pixels ordered (row, col, channel)."""
        B, C, H, W = images.shape
        s = self.stride
        x = images.reshape(B, C, H // s, s, W // s, s)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // s) * (W // s), s * s * C)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of ``patchify``."""
        B, s, g = tokens.shape[0], self.stride, self.grid
        x = tokens.reshape(B, g, g, s, s, 3)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, 3, g * s, g * s)

    def forward_loss(
        self, images: torch.Tensor, pred: torch.Tensor, token_mask: torch.Tensor
    ) -> torch.Tensor:
        target = self.patchify(self.normalized_images(images)[0])
        per_token = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
        m = token_mask.to(per_token.dtype)
        return (per_token * m).sum() / m.sum()

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None, plan: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``plan`` (``encoder.plan(mask)``) may be computed ahead, e.g. in data-loader workers."""
        if mask is None:
            mask = self.random_mask(images.shape[0])
        token_mask = self.token_mask(mask).to(images.device)
        latent = self.encoder.forward_visible(images, mask, plan)
        pred = self.forward_decoder(latent, token_mask)
        return self.forward_loss(images, pred, token_mask), pred, mask

    @torch.no_grad()
    def reconstruction(
        self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Visible pixels from ``images``, masked ones predicted, in the space of ``images``."""
        B, C, H, W = images.shape
        u = self.unit
        _, mean, std = self.normalized_images(images)
        out = self.unpatchify(pred.float()).view(B, C, H // u, u, W // u, u) * std + mean
        keep = ~upsample_mask(mask.to(images.device), u)[:, None]  # (B, 1, H, W)
        return torch.where(keep, images, out.view(B, C, H, W).to(images.dtype))
