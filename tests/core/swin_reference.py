"""An independent dense Swin in which attention to masked tokens is blocked.

Written from Swin's definition (cyclic shift, in-window positions, region mask), using the
model's parameters but none of its visible-token code: the reference for the masked encoder.
"""

from __future__ import annotations

import torch


def _band(c: torch.Tensor, size: int, window: int, shift: int) -> torch.Tensor:
    """Swin's shifted-window regions along one axis (slices [0,-ws), [-ws,-s), [-s,))."""
    return (c >= size - window).long() + (c >= size - shift).long()


def reference_attention(blk, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Brute-force (L x L) window attention of a timm block on x (B, H, W, C); masked (B, H, W)."""
    B, H, W, C = x.shape
    ws, s = blk.window_size[0], blk.shift_size[0]
    heads = blk.attn.num_heads
    hh, wh = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    hr, wr = ((hh - s) % H).flatten(), ((wh - s) % W).flatten()  # after the cyclic shift
    win = (hr // ws) * (W // ws) + wr // ws
    region = _band(hr, H, ws, s) * 3 + _band(wr, W, ws, s) if s else torch.zeros_like(win)
    same = (win[:, None] == win[None]) & (region[:, None] == region[None])
    ih, iw = hr % ws, wr % ws  # position inside the window
    rel = (ih[:, None] - ih[None] + ws - 1) * (2 * ws - 1) + (iw[:, None] - iw[None] + ws - 1)
    bias = blk.attn.relative_position_bias_table[rel.clamp(0, (2 * ws - 1) ** 2 - 1)]  # (L, L, h)

    L = H * W
    qkv = blk.attn.qkv(x.reshape(B, L, C)).reshape(B, L, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = (q * blk.attn.scale) @ k.transpose(-2, -1) + bias.permute(2, 0, 1)
    key_visible = ~masked.reshape(B, 1, 1, L)
    allowed = (same & key_visible) | torch.eye(L, dtype=torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, C)
    return blk.attn.proj(out).reshape(B, H, W, C)


def reference_stages(model, images: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each stage's dense output (B, H_s, W_s, C_s); ``mask`` (B, Hu, Wu) True = masked, or None."""
    x = model.patch_embed(images)
    B, H, W, _ = x.shape
    if mask is None:
        mask = torch.zeros(B, 1, 1, dtype=torch.bool)
    outputs = []
    for layer in model.layers:
        x = layer.downsample(x)
        _, H, W, _ = x.shape
        scale = H // mask.shape[1]
        masked = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        for blk in layer.blocks:
            x = x + blk.drop_path1(reference_attention(blk, blk.norm1(x), masked))
            x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
        outputs.append(x)
    return outputs


def at_visible(dense_bhwc: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Visible tokens (B, N, C) of a dense stage output, row-major."""
    B, H, W, C = dense_bhwc.shape
    scale = H // mask.shape[1]
    visible = ~mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return dense_bhwc[visible].view(B, -1, C)
