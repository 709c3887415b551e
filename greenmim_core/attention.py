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

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .grouping import CostModel, optimal_grouping


@dataclass(frozen=True)
class WindowPlan:
    """Frozen layout of one window partition, O(tokens) in size; derived from coordinates only.

    gather:      (G*g,) long, token index of each slot; padding slots hold ``T`` (a zero row).
    scatter:     (T,) long, slot of each token.
    slot_window: (G, g) long, window of each slot; padding slots get distinct negative ids.
    slot_hw:     (G, g, 2) long, stage coordinates of each slot (0 for padding).
    """

    group_size: int
    num_groups: int
    window: int
    gather: torch.Tensor
    scatter: torch.Tensor
    slot_window: torch.Tensor
    slot_hw: torch.Tensor

    @property
    def executed_tokens(self) -> int:
        """Tokens the attention core runs on, padding included."""
        return self.group_size * self.num_groups

    def to(self, device: torch.device) -> WindowPlan:
        return replace(
            self,
            **{
                f: getattr(self, f).to(device, non_blocking=True)
                for f in ("gather", "scatter", "slot_window", "slot_hw")
            },
        )

    def attention_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, 1, g, g) bool: attention allowed (same window); (G, g, g) long: bias table index.

        Computed on the plan's device, once per forward, shared by the blocks that use the plan.
        """
        w = self.slot_window
        allowed = (w[:, :, None] == w[:, None, :]).unsqueeze(1)
        ws = self.window
        rel = self.slot_hw[:, :, None, :] - self.slot_hw[:, None, :, :] + (ws - 1)
        rel = rel.clamp_(0, 2 * ws - 2)  # pairs across windows are masked anyway
        return allowed, rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def plan_windows(
    visible_bhw: torch.Tensor,
    coords_t3: torch.Tensor,
    window: int,
    shift: int,
    max_group: int | None = None,
    cost: CostModel | None = None,
) -> WindowPlan:
    """Plan group window attention on one stage.

    visible_bhw: (B, H, W) bool, True = visible token; coords_t3: ``visible_bhw.nonzero()``.
    Windows of all samples are packed together by ``optimal_grouping``; a window never mixes
    samples. No sorting: occupancies and ranks come from one cumulative sum over the grid,
    padded by ``window - shift`` at the top/left so that shifted windows align to ``window``.
    """
    B, H, W = visible_bhw.shape
    T = len(coords_t3)
    lo = (window - shift) % window
    pad_h, pad_w = -(H + lo) % window, -(W + lo) % window
    grid = F.pad(visible_bhw.to(torch.int32), (lo, pad_w, lo, pad_h))
    nh, nw = grid.shape[1] // window, grid.shape[2] // window
    per_window = grid.view(B, nh, window, nw, window).transpose(2, 3).reshape(-1, window * window)
    rank_in_window = per_window.cumsum(1, dtype=torch.int32)
    counts = rank_in_window[:, -1]
    # each visible token's window, and its rank (order) among the visible tokens of the window
    b, h, w = coords_t3.unbind(1)
    h, w = h + lo, w + lo
    win_t = (b * nh + h // window) * nw + w // window
    rank = rank_in_window[win_t, (h % window) * window + w % window].long() - 1

    packing = optimal_grouping(counts.numpy(), max_group=max_group, cost=cost or CostModel())
    g, G = packing.group_size, packing.num_groups
    window_group = torch.tensor(packing.window_group)
    window_offset = torch.tensor(packing.window_offset)
    scatter = window_group[win_t] * g + window_offset[win_t] + rank

    gather = torch.full((G * g,), T, dtype=torch.long)
    gather[scatter] = torch.arange(T)
    slot_window = -1 - torch.arange(G * g)  # padding: distinct ids, each attends to itself
    slot_window[scatter] = win_t
    slot_hw = torch.zeros(G * g, 2, dtype=torch.long)
    slot_hw[scatter] = coords_t3[:, 1:]
    return WindowPlan(g, G, window, gather, scatter, slot_window.view(G, g), slot_hw.view(G, g, 2))


def group_attention(
    attn: nn.Module,
    x_tc: torch.Tensor,
    plan: WindowPlan,
    layout: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Window attention of a timm ``WindowAttention`` module on flat tokens (T, C) -> (T, C).

    Any module with ``qkv``, ``num_heads``, ``attn_drop``, ``proj`` and ``proj_drop`` works
    (Twins' ``LocallyGroupedAttn``); the relative position bias is added only if the module has
    a ``relative_position_bias_table``.

    ``layout`` is ``plan.attention_layout()``, passed in to share it across blocks.
    """
    allowed, rel_index = layout if layout is not None else plan.attention_layout()
    G, g, heads = plan.num_groups, plan.group_size, attn.num_heads
    qkv = attn.qkv(x_tc)
    qkv = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])])[plan.gather]  # (G*g, 3C)
    q, k, v = qkv.view(G, g, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (G, h, g, d)
    table = getattr(attn, "relative_position_bias_table", None)  # Twins' LSA has none
    if table is None:
        attn_mask = allowed
    else:
        bias = table[rel_index].permute(0, 3, 1, 2)  # (G, h, g, g)
        attn_mask = bias.to(q.dtype).masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
    )
    out = out.transpose(1, 2).reshape(G * g, -1)[plan.scatter]  # (T, C)
    return attn.proj_drop(attn.proj(out))
