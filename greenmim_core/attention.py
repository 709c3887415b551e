"""Group window attention over visible tokens (W-MSA and SW-MSA).

Tokens live unpadded as a flat ``(T, C)`` array (all samples of the batch, row-major per
sample). Only the attention core needs the grouped layout: ``plan_windows`` assigns every
token to a slot of a ``(G, g)`` grid of groups, ``group_attention`` gathers q/k/v into it,
runs the attention core with a mask that forbids attention across windows and to padding, adds
Swin's relative position bias from the tokens' true coordinates, and gathers the result back to
``(T, C)``.

Two exact attention cores (``ATTENTION_BACKENDS``):

* ``sdpa``: ``scaled_dot_product_attention`` with an additive (G, heads, g, g) bias + mask,
  materialised from ``WindowPlan.attention_layout()``; runs everywhere.
* ``flex``: FlexAttention; a ``score_mod`` adds the bias looked up from the slots'
  coordinates and a block mask (``mask_mod``: same window) keeps windows apart, so no
  (G, heads, g, g) tensor is built or saved for backward. Compiled on CUDA; on CPU, torch 2.14
  has its forward only (no backward), so ``auto`` picks it on CUDA and ``sdpa`` elsewhere.

Shifted windows are a second partition of the same coordinates: with a shift ``s`` the window
index along an axis is ``(h + ws - s) // ws``, i.e. the cyclic shift of Swin with its region
mask, written without the roll (partial windows at both borders).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

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

    def apply(self, fn) -> WindowPlan:
        """The plan with ``fn`` applied to each index tensor (device copies, pinning)."""
        return replace(self, **{f: fn(getattr(self, f)) for f in _FIELDS})

    def to(self, device: torch.device) -> WindowPlan:
        return self.apply(lambda t: t.to(device, non_blocking=True))

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


_FIELDS = ("gather", "scatter", "slot_window", "slot_hw")


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


ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``flex`` on CUDA (where it trains and is compiled), ``sdpa`` elsewhere."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return backend


def attention_layout(plan: WindowPlan, backend: str) -> Any:
    """What the attention core of ``backend`` needs from ``plan`` besides its index tensors:
    ``plan.attention_layout()`` for ``sdpa``, a block mask for ``flex``. Shared by the blocks
    that use the plan, built once per forward on the plan's device."""
    if backend == "sdpa":
        return plan.attention_layout()
    from torch.nn.attention.flex_attention import create_block_mask

    win = plan.slot_window

    def same_window(b, h, q, kv):
        return win[b, q] == win[b, kv]  # padding slots have distinct ids: they see themselves

    G, g = plan.num_groups, plan.group_size
    return create_block_mask(same_window, G, None, g, g, device=win.device, _compile=False)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic: the number of groups changes with every batch of masks
    return torch.compile(flex_attention, dynamic=True)


def _flex_core(table, q, k, v, plan: WindowPlan, block_mask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    # table: ((2ws-1)^2, heads) relative position bias, or None (no bias)
    ws = plan.window
    span = 2 * ws - 1
    hh, ww = plan.slot_hw.unbind(-1)  # (G, g) stage coordinates of each slot

    def relative_bias(score, b, h, q_idx, kv_idx):
        dh = (hh[b, q_idx] - hh[b, kv_idx] + ws - 1).clamp(0, span - 1)
        dw = (ww[b, q_idx] - ww[b, kv_idx] + ws - 1).clamp(0, span - 1)
        return score + table[dh * span + dw, h].to(score.dtype)

    fn = _flex_attention() if q.device.type == "cuda" else flex_attention
    score_mod = None if table is None else relative_bias
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask)


def group_attention(
    attn: nn.Module,
    x_tc: torch.Tensor,
    plan: WindowPlan,
    layout: Any = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Window attention of a timm ``WindowAttention`` module on flat tokens (T, C) -> (T, C).

    Any module with ``qkv``, ``num_heads``, ``attn_drop``, ``proj`` and ``proj_drop`` works
    (Twins' ``LocallyGroupedAttn``); the relative position bias is added only if the module has
    a ``relative_position_bias_table``. ``backend`` is ``sdpa`` or ``flex``
    (``resolve_backend``); ``layout`` is ``attention_layout(plan, backend)``, passed in to
    share it across blocks.
    """
    if layout is None:
        layout = attention_layout(plan, backend)
    G, g, heads = plan.num_groups, plan.group_size, attn.num_heads
    qkv = attn.qkv(x_tc)
    qkv = torch.cat([qkv, qkv.new_zeros(1, qkv.shape[1])])[plan.gather]  # (G*g, 3C)
    q, k, v = qkv.view(G, g, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (G, h, g, d)
    table = getattr(attn, "relative_position_bias_table", None)  # Twins' LSA has none
    if backend == "flex":
        if attn.training and attn.attn_drop.p > 0:
            raise ValueError("the flex attention core has no attention dropout; use sdpa")
        out = _flex_core(table, q, k, v, plan, layout)
    else:
        allowed, rel_index = layout
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
