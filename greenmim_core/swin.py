"""Green Swin: a timm Swin Transformer that also runs on visible tokens only.

``GreenSwin`` subclasses ``timm.models.swin_transformer.SwinTransformer``, so its parameters
*are* timm's (same modules, same key layout) and dense mode is timm's own forward. The
visible-only path reuses those modules: LayerNorm, qkv, projection and MLP run on unpadded
visible tokens; only the attention core runs on packed groups (``attention.py``); patch
merging concatenates visible 2x2 blocks, which are complete because mask units are multiples
of the final stride.

Encoder contract (``encoder.GreenEncoder``): ``img_size``, ``final_stride``, ``num_features``,
``plan(mask)`` and ``forward_visible(images, mask, plan) -> (B, N_vis, C)`` with tokens in
row-major order of their final-stage coordinates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from .attention import (
    CostModel,
    WindowPlan,
    attention_layout,
    group_attention,
    plan_windows,
    resolve_backend,
)
from .encoder import GreenEncoder, StageGeometry
from .masking import check_mask, upsample_mask
from .registry import register_model

# timm's PatchMerging concatenates the 2x2 block in this (dh, dw) order
_MERGE_OFFSETS = ((0, 0), (1, 0), (0, 1), (1, 1))


@dataclass(frozen=True)
class SwinConfig(StageGeometry):
    """Architecture of a Green Swin; stored in every checkpoint and checked on load."""

    name: str
    timm_arch: str
    img_size: int = 224
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_heads", tuple(self.num_heads))
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} must match")
        for name in ("img_size", "patch_size", "embed_dim", "window_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.img_size % self.final_stride:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by the final stride "
                f"{self.final_stride} (patch_size {self.patch_size}, {len(self.depths)} stages)"
            )
        for i, grid in enumerate(self.stage_grids):
            if grid > self.window_size and grid % self.window_size:
                raise ValueError(
                    f"window_size {self.window_size} does not divide stage {i} grid {grid} "
                    f"(img_size {self.img_size})"
                )
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim << i) % heads:
                raise ValueError(
                    f"stage {i} width {self.embed_dim << i} not divisible by {heads} heads"
                )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def num_features(self) -> int:
        return self.embed_dim << (len(self.depths) - 1)

    def model_args(self) -> dict[str, Any]:
        """Keyword arguments that make ``timm.create_model(self.timm_arch, ...)`` this architecture."""
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            window_size=self.window_size,
            embed_dim=self.embed_dim,
            depths=list(self.depths),
            num_heads=list(self.num_heads),
            mlp_ratio=self.mlp_ratio,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self) -> GreenSwin:
        return GreenSwin(self)


@dataclass(frozen=True)
class StagePlan:
    """Visible tokens of one stage: coordinates, merge indices and one window plan per block.

    coords: (T, 3) long rows (sample, h, w), row-major per sample.
    merge:  (T, 4) long indices into the previous stage's tokens, None for the first stage.
    """

    grid: int
    coords: torch.Tensor
    merge: torch.Tensor | None
    block_plans: tuple[WindowPlan, ...]


@dataclass(frozen=True)
class EncoderPlan:
    """All stages' plans for one batch of masks. Blocks of a stage with the same window
    partition share one ``WindowPlan`` object; ``to`` and ``pin_memory`` keep the sharing."""

    batch: int
    stages: tuple[StagePlan, ...]

    def _map(self, fn) -> EncoderPlan:
        cache: dict[int, WindowPlan] = {}
        stages = []
        for s in self.stages:
            plans = tuple(cache.setdefault(id(p), p.apply(fn)) for p in s.block_plans)
            merge = None if s.merge is None else fn(s.merge)
            stages.append(StagePlan(s.grid, fn(s.coords), merge, plans))
        return EncoderPlan(self.batch, tuple(stages))

    def to(self, device: torch.device) -> EncoderPlan:
        """Copies to ``device``; asynchronous from pinned memory (``pin_memory``)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> EncoderPlan:
        """A copy in page-locked memory (DataLoader's ``pin_memory=True`` calls this)."""
        return self._map(lambda t: t.pin_memory())

    @property
    def executed_tokens(self) -> int:
        """Token slots the attention cores of all blocks run on, padding included."""
        return sum(p.executed_tokens for s in self.stages for p in s.block_plans)

    @property
    def visible_tokens(self) -> int:
        """Visible tokens summed over all blocks (what a perfect visible-only encoder runs)."""
        return sum(len(s.coords) * len(s.block_plans) for s in self.stages)


class GreenSwin(GreenEncoder, SwinTransformer):
    """timm Swin whose ``forward(images, mask)`` computes on visible tokens when given a mask."""

    def __init__(self, cfg: SwinConfig):
        super().__init__(num_classes=0, drop_path_rate=cfg.drop_path_rate, **cfg.model_args())
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.final_stride = cfg.final_stride
        # attention core of the visible path (``attention.ATTENTION_BACKENDS``): not a
        # hyper-parameter, both are exact; ``auto`` picks per device
        self.attention_backend = "auto"

    def plan(
        self, mask: torch.Tensor, max_group: int | None = None, cost: CostModel | None = None
    ) -> EncoderPlan:
        """Everything the visible forward needs from ``mask`` (B, Hu, Wu) bool, True = masked."""
        mask = mask.detach().to("cpu", torch.bool)
        B = mask.shape[0]
        unit = check_mask(mask, self.img_size, self.final_stride)

        stages: list[StagePlan] = []
        prev_pos = None
        for i, layer in enumerate(self.layers):
            grid = self.cfg.stage_grids[i]
            vis = ~upsample_mask(mask, unit // (self.cfg.patch_size << i))  # (B, grid, grid)
            coords = vis.nonzero()  # (T, 3) row-major per sample
            merge = None
            if prev_pos is not None:
                b, h, w = coords.unbind(1)
                merge = torch.stack(
                    [prev_pos[b, 2 * h + dh, 2 * w + dw] for dh, dw in _MERGE_OFFSETS], 1
                )
            prev_pos = torch.full(vis.shape, -1, dtype=torch.long)
            prev_pos[vis] = torch.arange(len(coords))

            by_partition: dict[tuple[int, int], WindowPlan] = {}
            plans = []
            for blk in layer.blocks:
                key = (blk.window_size[0], blk.shift_size[0])
                if key not in by_partition:
                    by_partition[key] = plan_windows(vis, coords, *key, max_group, cost)
                plans.append(by_partition[key])
            stages.append(StagePlan(grid, coords, merge, tuple(plans)))
        return EncoderPlan(B, tuple(stages))

    def forward_visible(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        plan: EncoderPlan | None = None,
        return_stages: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode the visible tokens of ``images`` (B, 3, H, W) under ``mask`` (B, Hu, Wu).

        Returns the final-stage visible tokens (B, N_vis, C) after the final norm, and with
        ``return_stages`` also each stage's output (B, N_s, C_s) as timm's stages produce it.
        """
        plan = (plan or self.plan(mask)).to(images.device)
        B, p = images.shape[0], self.cfg.patch_size
        proj = self.patch_embed.proj
        patches = F.unfold(images, p, stride=p).transpose(1, 2)  # (B, L, 3*p*p)
        b, h, w = plan.stages[0].coords.unbind(1)
        patches = patches[b, h * plan.stages[0].grid + w]  # (T, 3*p*p)
        x = self.patch_embed.norm(F.linear(patches, proj.weight.flatten(1), proj.bias))

        backend = resolve_backend(self.attention_backend, images.device)
        # keyed by the index tensor: wrappers such as DDP may rebuild the plan's dataclasses
        layouts = {
            id(p.gather): attention_layout(p, backend) for s in plan.stages for p in s.block_plans
        }
        outputs = []
        for layer, stage in zip(self.layers, plan.stages, strict=True):
            if stage.merge is not None:
                x = layer.downsample.reduction(layer.downsample.norm(x[stage.merge].flatten(1)))
            x = x.view(B, -1, x.shape[-1])
            for blk, wplan in zip(layer.blocks, stage.block_plans, strict=True):
                x = _block_forward(blk, x, wplan, layouts[id(wplan.gather)], backend)
            outputs.append(x)
            x = x.flatten(0, 1)
        x = self.norm(outputs[-1])
        return (x, outputs) if return_stages else x

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C) tokens: all of them (dense timm Swin) or the visible ones under ``mask``."""
        if mask is None:
            return self.forward_features(images).flatten(1, 2)
        return self.forward_visible(images, mask)


def _block_forward(
    blk: SwinTransformerBlock,
    x: torch.Tensor,
    plan: WindowPlan,
    layout: Any,
    backend: str,
) -> torch.Tensor:
    """timm's block on visible tokens (B, N, C): only attention sees the grouped layout."""
    B, N, C = x.shape
    x_tc = blk.norm1(x).view(B * N, C)
    attn = group_attention(blk.attn, x_tc, plan, layout, backend).view(B, N, C)
    x = x + blk.drop_path1(attn)
    return x + blk.drop_path2(blk.mlp(blk.norm2(x)))


# timm's four sizes: (embed_dim, depths, heads); every variant is one registered function
_SIZES = {
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "large": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


def _swin(size: str, window_size: int, img_size: int) -> SwinConfig:
    dim, depths, heads = _SIZES[size]
    return SwinConfig(
        name=f"swin_{size}_patch4_window{window_size}_{img_size}",
        timm_arch=f"swin_{size}_patch4_window7_224",
        img_size=img_size,
        embed_dim=dim,
        depths=depths,
        num_heads=heads,
        window_size=window_size,
    )


def _swin_micro(window_size: int) -> SwinConfig:
    """Tiny CPU variant: patch 2 gives a final stride of 16, so 64 px has 4x4 mask units."""
    return SwinConfig(
        name=f"swin_micro_patch2_window{window_size}_64",
        timm_arch="swin_tiny_patch4_window7_224",
        img_size=64,
        patch_size=2,
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 4, 8),
        window_size=window_size,
    )


@register_model
def swin_tiny_patch4_window7_224() -> SwinConfig:
    return _swin("tiny", 7, 224)


@register_model
def swin_tiny_patch4_window14_224() -> SwinConfig:
    return _swin("tiny", 14, 224)


@register_model
def swin_tiny_patch4_window6_192() -> SwinConfig:
    return _swin("tiny", 6, 192)


@register_model
def swin_tiny_patch4_window12_192() -> SwinConfig:
    return _swin("tiny", 12, 192)


@register_model
def swin_small_patch4_window7_224() -> SwinConfig:
    return _swin("small", 7, 224)


@register_model
def swin_small_patch4_window14_224() -> SwinConfig:
    return _swin("small", 14, 224)


@register_model
def swin_small_patch4_window6_192() -> SwinConfig:
    return _swin("small", 6, 192)


@register_model
def swin_small_patch4_window12_192() -> SwinConfig:
    return _swin("small", 12, 192)


@register_model
def swin_base_patch4_window7_224() -> SwinConfig:
    return _swin("base", 7, 224)


@register_model
def swin_base_patch4_window14_224() -> SwinConfig:
    return _swin("base", 14, 224)


@register_model
def swin_base_patch4_window6_192() -> SwinConfig:
    return _swin("base", 6, 192)


@register_model
def swin_base_patch4_window12_192() -> SwinConfig:
    return _swin("base", 12, 192)


@register_model
def swin_large_patch4_window7_224() -> SwinConfig:
    return _swin("large", 7, 224)


@register_model
def swin_large_patch4_window14_224() -> SwinConfig:
    return _swin("large", 14, 224)


@register_model
def swin_large_patch4_window6_192() -> SwinConfig:
    return _swin("large", 6, 192)


@register_model
def swin_large_patch4_window12_192() -> SwinConfig:
    return _swin("large", 12, 192)


@register_model
def swin_micro_patch2_window4_64() -> SwinConfig:
    return _swin_micro(4)


@register_model
def swin_micro_patch2_window8_64() -> SwinConfig:
    return _swin_micro(8)
