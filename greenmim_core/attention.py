"""Group window attention over visible tokens (W-MSA and SW-MSA).

Tokens live unpadded as a flat ``(T, C)`` array (all samples of the batch, row-major per
sample). Only the attention core needs the grouped layout: ``plan_windows`` assigns every
token to a slot of a ``(G, g)`` grid of groups, ``group_attention`` gathers q/k/v into it,
runs ``scaled_dot_product_attention`` with a mask that forbids attention across windows and to
padding, adds Swin's relative position bias from the tokens' true coordinates, and gathers the
result back to ``(T, C)``.

Shifted windows are a second partition of the same coordinates: with a shift ``s`` the window
index along an axis is ``(h + ws - s) // ws``, i.e. the cyclic shift of Swin with its region
mask, written without the roll (partial windows at both borders).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .grouping import CostModel, optimal_grouping


@dataclass(frozen=True)
class WindowPlan:
    """Frozen layout of one window partition; every field is derived from coordinates only.

    gather:     (G*g,) long, token index for each slot; padding slots hold ``T`` (a zero row).
    scatter:    (T,) long, slot of each token.
    attn_bias_mask: (G, 1, g, g) float, 0 where attention is allowed, -inf elsewhere.
    rel_index:  (G, g, g) long, index into the relative position bias table.
    """

    group_size: int
    num_groups: int
    gather: torch.Tensor
    scatter: torch.Tensor
    attn_bias_mask: torch.Tensor
    rel_index: torch.Tensor

    @property
    def executed_tokens(self) -> int:
        """Tokens the attention core runs on, padding included."""
        return self.group_size * self.num_groups

    def to(self, device: torch.device) -> WindowPlan:
        return WindowPlan(
            self.group_size,
            self.num_groups,
            self.gather.to(device, non_blocking=True),
            self.scatter.to(device, non_blocking=True),
            self.attn_bias_mask.to(device, non_blocking=True),
            self.rel_index.to(device, non_blocking=True),
        )


def window_ids(
    coords_t3: torch.Tensor, batch: int, grid: tuple[int, int], window: int, shift: int
) -> tuple[torch.Tensor, int]:
    """Window index of each token and the number of windows of the whole batch.

    coords_t3: (T, 3) long rows ``(sample, h, w)``.
    """
    H, W = grid
    b, h, w = coords_t3.unbind(1)
    if shift:
        h, w = h + window - shift, w + window - shift
        nh, nw = H // window + 1, W // window + 1
    else:
        nh, nw = H // window, W // window
    return (b * nh + h // window) * nw + w // window, batch * nh * nw


def plan_windows(
    coords_t3: torch.Tensor,
    batch: int,
    grid: tuple[int, int],
    window: int,
    shift: int,
    max_group: int | None = None,
    cost: CostModel | None = None,
) -> WindowPlan:
    """Plan group window attention for tokens at ``coords_t3`` (T, 3) of ``batch`` samples on a ``grid`` stage.

    Windows of all samples are packed together by ``optimal_grouping``; a window never
    mixes samples because the window index includes the sample.
    """
    T = len(coords_t3)
    win_t, num_windows = window_ids(coords_t3, batch, grid, window, shift)
    counts = torch.bincount(win_t, minlength=num_windows)
    packing = optimal_grouping(counts.numpy(), max_group=max_group, cost=cost or CostModel())
    g, G = packing.group_size, packing.num_groups
    window_group = torch.tensor(packing.window_group)
    window_offset = torch.tensor(packing.window_offset)

    # rank of each token inside its window (tokens arrive row-major, so sort by window)
    order = torch.argsort(win_t, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(win_t)
    rank[order] = torch.arange(T) - starts[win_t[order]]
    scatter = window_group[win_t] * g + window_offset[win_t] + rank

    gather = torch.full((G * g,), T, dtype=torch.long)
    gather[scatter] = torch.arange(T)
    # padding slots get distinct negative window ids: each attends only to itself
    slot_win = -1 - torch.arange(G * g)
    slot_win[scatter] = win_t
    slot_win = slot_win.view(G, g)
    allowed = slot_win[:, :, None] == slot_win[:, None, :]
    attn_bias_mask = torch.zeros(G, 1, g, g).masked_fill_(~allowed[:, None], float("-inf"))

    slot_hw = torch.zeros(G * g, 2, dtype=torch.long)
    slot_hw[scatter] = coords_t3[:, 1:]
    slot_hw = slot_hw.view(G, g, 2)
    rel = slot_hw[:, :, None, :] - slot_hw[:, None, :, :] + (window - 1)
    rel = rel.clamp_(0, 2 * window - 2)  # pairs across windows are masked anyway
    rel_index = rel[..., 0] * (2 * window - 1) + rel[..., 1]
    return WindowPlan(g, G, gather, scatter, attn_bias_mask, rel_index)


def group_attention(attn: nn.Module, x_tc: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """Window attention of a timm ``WindowAttention`` module on flat tokens (T, C) -> (T, C)."""
    T, C = x_tc.shape
    G, g, heads = plan.num_groups, plan.group_size, attn.num_heads
    qkv = attn.qkv(x_tc)
    qkv = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])])[plan.gather]  # (G*g, 3C)
    q, k, v = qkv.view(G, g, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (G, h, g, d)
    bias = attn.relative_position_bias_table[plan.rel_index].permute(0, 3, 1, 2)  # (G, h, g, g)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=bias.to(q.dtype) + plan.attn_bias_mask.to(q.dtype),
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
    )
    out = out.transpose(1, 2).reshape(G * g, -1)[plan.scatter]  # (T, C)
    return attn.proj_drop(attn.proj(out))
