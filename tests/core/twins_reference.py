"""An independent dense Twins in which masked tokens are zeros to convolutions and never keys.

Written from Twins' definition with the model's parameters but none of its visible-token code
(no plans, no sparse convolutions, no grouping): every convolution runs densely on the image
with masked tokens zeroed, every attention is a brute-force (L x L) one with masked keys
blocked. It is the reference for the masked encoder, compared at visible positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    B, L, C = t.shape
    return t.view(B, L, heads, C // heads).transpose(1, 2)  # (B, h, L, d)


def _attend(q, k, v, allowed, scale):
    scores = (q * scale) @ k.transpose(-2, -1)
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


def _grid_image(x_blc: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Tokens (B, L, C) -> zero-filled image (B, C, H, W) with masked tokens set to zero."""
    B, H, W = visible.shape
    x = x_blc * visible.reshape(B, H * W, 1)
    return x.transpose(1, 2).reshape(B, -1, H, W)


def reference_attention(attn, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """LSA or GSA of a timm Twins block on x (B, L, C); visible (B, H, W) bool."""
    B, L, C = x.shape
    H, W = visible.shape[1:]
    heads = attn.num_heads
    if hasattr(attn, "ws"):  # locally-grouped: attention inside ws x ws windows
        ws = attn.ws
        hh, wh = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        win = ((hh // ws) * (W // ws) + wh // ws).flatten()
        q, k, v = (_heads(t, heads) for t in attn.qkv(x).chunk(3, dim=-1))
        same = win[:, None] == win[None]
        allowed = (same & visible.reshape(B, 1, 1, L)) | torch.eye(L, dtype=torch.bool)
    else:  # global sub-sampled: keys from the reduced image, coarse sites with a visible input
        q = _heads(attn.q(x), heads)
        if attn.sr is not None:
            src = attn.sr(_grid_image(x, visible)).flatten(2).transpose(1, 2)
            src = attn.norm(src)
            s = attn.sr_ratio
            key_visible = F.max_pool2d(visible[:, None].float(), s, s).flatten(1) > 0
        else:
            src, key_visible = x, visible.reshape(B, L)
        k, v = (_heads(t, heads) for t in attn.kv(src).chunk(2, dim=-1))
        allowed = key_visible[:, None, None, :]
    return attn.proj(_attend(q, k, v, allowed, attn.scale))


def reference_stages(model, images: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each stage's dense output (B, H_s, W_s, C_s); ``mask`` (B, Hu, Wu) True = masked, or None."""
    B = images.shape[0]
    if mask is None:
        mask = torch.zeros(B, 1, 1, dtype=torch.bool)
    scale = images.shape[-1] // mask.shape[1]
    x = images * ~mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)[:, None]
    outputs = []
    for embed, blocks, peg in zip(model.patch_embeds, model.blocks, model.pos_block, strict=True):
        x = embed.proj(x)  # (B, C, H, W), masked inputs already zero
        _, C, H, W = x.shape
        f = H // mask.shape[1]
        visible = ~mask.repeat_interleave(f, 1).repeat_interleave(f, 2)
        x = embed.norm(x.flatten(2).transpose(1, 2))  # (B, L, C)
        for j, blk in enumerate(blocks):
            x = x + blk.drop_path1(reference_attention(blk.attn, blk.norm1(x), visible))
            x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
            if j == 0:
                x = x + peg.proj(_grid_image(x, visible)).flatten(2).transpose(1, 2)
        outputs.append(x.view(B, H, W, C))
        x = _grid_image(x, visible)
    return outputs
