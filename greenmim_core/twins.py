"""Green Twins: a timm Twins (PCPVT or SVT) that also runs on visible tokens only.

``GreenTwins`` subclasses ``timm.models.twins.Twins``, so its parameters *are* timm's (same
modules, same key layout) and dense mode is timm's own forward. The visible-only path reuses
those modules on unpadded visible tokens:

* LayerNorm, q/kv/qkv, projections and MLPs run on visible tokens;
* locally-grouped attention (SVT's LSA) is group window attention (``attention.py``) without
  relative position bias;
* global sub-sampled attention (GSA): queries are the visible tokens; keys and values come from
  the ``sr`` reduction as a sparse strided convolution (coarse sites with >= 1 visible input),
  padded per sample with a key mask since samples may reach different numbers of coarse sites;
* the position encoding generator (PEG) is a submanifold depthwise convolution + residual, and
  the patch embeddings between stages are sparse strided convolutions (``sparse_conv.py``).

Masked tokens count as zeros in every convolution and are never attended to. Encoder contract
(``encoder.GreenEncoder``): ``img_size``, ``final_stride``, ``num_features``, ``mask_grid(unit)``,
``plan(mask)``, ``forward_visible(images, mask, plan) -> (B, N_vis, C)`` row-major.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.twins import Block, GlobalSubSampleAttn, LocallyGroupedAttn, Twins

from .attention import CostModel, WindowPlan, group_attention, plan_windows
from .encoder import GreenEncoder, StageGeometry
from .masking import check_mask, upsample_mask
from .registry import register_model
from .sparse_conv import (
    StridedPlan,
    SubmanifoldPlan,
    plan_strided,
    plan_submanifold,
    strided_conv,
    submanifold_depthwise,
)

_PER_STAGE = ("embed_dims", "num_heads", "mlp_ratios", "depths", "sr_ratios")


@dataclass(frozen=True)
class TwinsConfig(StageGeometry):
    """Architecture of a Green Twins; ``wss`` (LSA window per stage) set = SVT, None = PCPVT."""

    name: str
    timm_arch: str
    img_size: int = 224
    patch_size: int = 4
    embed_dims: tuple[int, ...] = (64, 128, 256, 512)
    num_heads: tuple[int, ...] = (2, 4, 8, 16)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0)
    depths: tuple[int, ...] = (2, 2, 10, 4)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    wss: tuple[int, ...] | None = (7, 7, 7, 7)
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in (*_PER_STAGE, "wss"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.depths)
        for name in (*_PER_STAGE, "wss"):
            value = getattr(self, name)
            if value is not None and (len(value) != n or not n):
                raise ValueError(f"{name} {value} must have one entry per stage ({n} stages)")
            if value is not None and not all(v > 0 for v in value):
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("img_size", "patch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.img_size % self.final_stride:
            raise ValueError(
                f"img_size {self.img_size} is not divisible by the final stride "
                f"{self.final_stride} (patch_size {self.patch_size}, {n} stages)"
            )
        for i, grid in enumerate(self.stage_grids):
            if self.embed_dims[i] % self.num_heads[i]:
                raise ValueError(
                    f"stage {i} width {self.embed_dims[i]} not divisible by "
                    f"{self.num_heads[i]} heads"
                )
            if grid % self.sr_ratios[i]:
                raise ValueError(
                    f"sr_ratio {self.sr_ratios[i]} does not divide stage {i} grid {grid} "
                    f"(img_size {self.img_size})"
                )
            # timm pads ragged windows with zero tokens that stay attendable: not a visible-only
            # computation, so windows must tile the grid
            if self.wss is not None and (self.wss[i] < 2 or grid % self.wss[i]):
                raise ValueError(
                    f"window size {self.wss[i]} must be >= 2 and divide stage {i} grid {grid} "
                    f"(img_size {self.img_size})"
                )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def num_features(self) -> int:
        return self.embed_dims[-1]

    def model_args(self) -> dict[str, Any]:
        """Keyword arguments that make ``timm.create_model(self.timm_arch, ...)`` this architecture."""
        return dict(
            img_size=self.img_size,
            patch_size=self.patch_size,
            embed_dims=list(self.embed_dims),
            num_heads=list(self.num_heads),
            mlp_ratios=list(self.mlp_ratios),
            depths=list(self.depths),
            sr_ratios=list(self.sr_ratios),
            wss=None if self.wss is None else list(self.wss),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build(self) -> GreenTwins:
        return GreenTwins(self)


@dataclass(frozen=True)
class TwinsStagePlan:
    """Visible tokens of one stage and the index tables of everything that mixes them.

    coords:  (T, 3) long rows (sample, h, w), row-major per sample.
    embed:   patch embedding from the previous stage's tokens (None for the first stage).
    peg:     the PEG's 3x3 neighbourhoods.
    windows: LSA windows (SVT), None for PCPVT.
    reduce:  GSA's ``sr`` reduction, None when ``sr_ratio == 1`` (keys = the visible tokens).
    """

    grid: int
    coords: torch.Tensor
    embed: StridedPlan | None
    peg: SubmanifoldPlan
    windows: WindowPlan | None
    reduce: StridedPlan | None

    def to(self, device: torch.device) -> TwinsStagePlan:
        def move(p):
            return None if p is None else p.to(device)

        return TwinsStagePlan(
            self.grid,
            self.coords.to(device),
            move(self.embed),
            self.peg.to(device),
            move(self.windows),
            move(self.reduce),
        )


@dataclass(frozen=True)
class TwinsPlan:
    batch: int
    stages: tuple[TwinsStagePlan, ...]

    def to(self, device: torch.device) -> TwinsPlan:
        return TwinsPlan(self.batch, tuple(s.to(device) for s in self.stages))


class GreenTwins(GreenEncoder, Twins):
    """timm Twins whose ``forward(images, mask)`` computes on visible tokens when given a mask.

    ``sparse_backend`` ("auto", "torch", "spconv") runs the strided convolutions; it is a
    runtime choice, not part of the architecture.
    """

    def __init__(self, cfg: TwinsConfig, sparse_backend: str = "auto"):
        super().__init__(num_classes=0, drop_path_rate=cfg.drop_path_rate, **cfg.model_args())
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.final_stride = cfg.final_stride
        self.sparse_backend = sparse_backend

    def plan(
        self, mask: torch.Tensor, max_group: int | None = None, cost: CostModel | None = None
    ) -> TwinsPlan:
        """Everything the visible forward needs from ``mask`` (B, Hu, Wu) bool, True = masked."""
        mask = mask.detach().to("cpu", torch.bool)
        B = mask.shape[0]
        unit = check_mask(mask, self.img_size, self.final_stride)
        cfg = self.cfg
        stages: list[TwinsStagePlan] = []
        for i, grid in enumerate(cfg.stage_grids):
            shape = (B, grid, grid)
            if not stages:
                embed = None
                visible = ~upsample_mask(mask, unit // cfg.patch_size)
                coords = visible.nonzero()
            else:
                prev = stages[-1]
                embed = plan_strided(prev.coords, (B, prev.grid, prev.grid), 2)
                coords = embed.out_coords
                visible = torch.zeros(shape, dtype=torch.bool)
                visible[coords.unbind(1)] = True
            windows = None
            if cfg.wss is not None:
                windows = plan_windows(visible, coords, cfg.wss[i], 0, max_group, cost)
            sr = cfg.sr_ratios[i]
            reduce = plan_strided(coords, shape, sr) if sr > 1 else None
            stages.append(
                TwinsStagePlan(
                    grid, coords, embed, plan_submanifold(coords, shape), windows, reduce
                )
            )
        return TwinsPlan(B, tuple(stages))

    def forward_visible(
        self,
        images: torch.Tensor,
        mask: torch.Tensor,
        plan: TwinsPlan | None = None,
        return_stages: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode the visible tokens of ``images`` (B, 3, H, W) under ``mask`` (B, Hu, Wu).

        Returns the final-stage visible tokens (B, N_vis, C) after the final norm, and with
        ``return_stages`` also each stage's output (B, N_s, C_s) before it.
        """
        plan = (plan or self.plan(mask)).to(images.device)
        B, p = images.shape[0], self.cfg.patch_size
        backend = self.sparse_backend
        outputs: list[torch.Tensor] = []
        for embed, drop, blocks, peg, stage in zip(
            self.patch_embeds, self.pos_drops, self.blocks, self.pos_block, plan.stages, strict=True
        ):
            if stage.embed is None:
                patches = F.unfold(images, p, stride=p).transpose(1, 2)  # (B, L, 3*p*p)
                b, h, w = stage.coords.unbind(1)
                patches = patches[b, h * stage.grid + w]  # (T, 3*p*p)
                x = F.linear(patches, embed.proj.weight.flatten(1), embed.proj.bias)
            else:
                x = strided_conv(embed.proj, outputs[-1].flatten(0, 1), stage.embed, backend)
            x = drop(embed.norm(x)).view(B, -1, x.shape[-1])
            layout = stage.windows.attention_layout() if stage.windows is not None else None
            for j, blk in enumerate(blocks):
                x = _block_forward(blk, x, stage, layout, backend)
                if j == 0:  # PEG after the first block, as in timm
                    pos = submanifold_depthwise(peg.proj[0], x.flatten(0, 1), stage.peg)
                    x = x + pos.view_as(x)
            outputs.append(x)
        x = self.norm(outputs[-1])
        return (x, outputs) if return_stages else x

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C) tokens: all of them (dense timm Twins) or the visible ones under ``mask``."""
        if mask is None:
            return self.forward_features(images)
        return self.forward_visible(images, mask)


def _block_forward(
    blk: Block,
    x: torch.Tensor,
    stage: TwinsStagePlan,
    layout: tuple[torch.Tensor, torch.Tensor] | None,
    backend: str,
) -> torch.Tensor:
    """timm's Twins block on visible tokens (B, N, C)."""
    B, N, C = x.shape
    h = blk.norm1(x)
    if isinstance(blk.attn, LocallyGroupedAttn):
        attn = group_attention(blk.attn, h.view(B * N, C), stage.windows, layout).view(B, N, C)
    elif isinstance(blk.attn, GlobalSubSampleAttn):
        attn = _global_attention(blk.attn, h, stage.reduce, backend)
    else:
        raise TypeError(f"unsupported Twins attention {type(blk.attn).__name__}")
    x = x + blk.drop_path1(attn)
    return x + blk.drop_path2(blk.mlp(blk.norm2(x)))


def _global_attention(
    attn: GlobalSubSampleAttn, x: torch.Tensor, reduce: StridedPlan | None, backend: str
) -> torch.Tensor:
    """GSA on visible tokens (B, N, C): keys/values from the visible part of the reduction."""
    B, N, C = x.shape
    heads = attn.num_heads
    q = attn.q(x).view(B, N, heads, C // heads).transpose(1, 2)  # (B, h, N, d)
    key_mask = None
    if attn.sr is None:
        kv = attn.kv(x)  # (B, N, 2C)
    else:
        kv = attn.kv(attn.norm(strided_conv(attn.sr, x.flatten(0, 1), reduce, backend)))
        kv = torch.cat([kv, kv.new_zeros(1, 2 * C)])[reduce.pad_index]  # (B, M, 2C)
        key_mask = reduce.pad_valid[:, None, None, :]  # (B, 1, 1, M)
    k, v = kv.view(B, -1, 2, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=key_mask, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))


# timm's architectures (twins.py), one registered function each under timm's name
_PCPVT = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))


def _timm_twins(name: str, **args: Any) -> TwinsConfig:
    return TwinsConfig(name=name, timm_arch=name, **args)


@register_model
def twins_pcpvt_small() -> TwinsConfig:
    return _timm_twins("twins_pcpvt_small", depths=(3, 4, 6, 3), wss=None, **_PCPVT)


@register_model
def twins_pcpvt_base() -> TwinsConfig:
    return _timm_twins("twins_pcpvt_base", depths=(3, 4, 18, 3), wss=None, **_PCPVT)


@register_model
def twins_pcpvt_large() -> TwinsConfig:
    return _timm_twins("twins_pcpvt_large", depths=(3, 8, 27, 3), wss=None, **_PCPVT)


@register_model
def twins_svt_small() -> TwinsConfig:
    return _timm_twins(
        "twins_svt_small",
        embed_dims=(64, 128, 256, 512),
        num_heads=(2, 4, 8, 16),
        depths=(2, 2, 10, 4),
    )


@register_model
def twins_svt_base() -> TwinsConfig:
    return _timm_twins(
        "twins_svt_base",
        embed_dims=(96, 192, 384, 768),
        num_heads=(3, 6, 12, 24),
        depths=(2, 2, 18, 2),
    )


@register_model
def twins_svt_large() -> TwinsConfig:
    return _timm_twins(
        "twins_svt_large",
        embed_dims=(128, 256, 512, 1024),
        num_heads=(4, 8, 16, 32),
        depths=(2, 2, 18, 2),
    )


# tiny CPU variants (patch 2: final stride 16, so a 64 px image has 4x4 mask units); timm builds
# them as ``timm.create_model(timm_arch, **model_args)``, every argument given explicitly
_MICRO = dict(
    img_size=64,
    patch_size=2,
    embed_dims=(16, 32, 48, 64),
    num_heads=(1, 2, 3, 4),
    mlp_ratios=(2.0, 2.0, 2.0, 2.0),
    depths=(2, 2, 2, 2),
    sr_ratios=(8, 4, 2, 1),
)


@register_model
def twins_pcpvt_micro() -> TwinsConfig:
    return TwinsConfig(name="twins_pcpvt_micro", timm_arch="twins_pcpvt_small", wss=None, **_MICRO)


@register_model
def twins_svt_micro() -> TwinsConfig:
    return TwinsConfig(
        name="twins_svt_micro", timm_arch="twins_svt_small", wss=(4, 4, 4, 4), **_MICRO
    )
