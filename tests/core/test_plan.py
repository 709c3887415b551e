"""Encoder plans for every registered architecture, checked against Swin's own window definition."""

import pytest
import torch

import greenmim_core as gc

pytestmark = pytest.mark.unit


def swin_window_and_region(coords_t3: torch.Tensor, grid: int, ws: int, shift: int) -> torch.Tensor:
    """One id per token for 'same window and same shift region', from Swin's cyclic shift."""
    b, h, w = coords_t3.unbind(1)
    hr, wr = (h - shift) % grid, (w - shift) % grid
    n = grid // ws
    win = (b * n + hr // ws) * n + wr // ws

    def band(c):
        return (
            (c >= grid - ws).long() + (c >= grid - shift).long() if shift else torch.zeros_like(c)
        )

    return win * 9 + band(hr) * 3 + band(wr)


@pytest.mark.parametrize("name", [n for n in gc.list_models() if n.startswith("swin_")])
def test_plans_group_exactly_swins_windows(name):
    with torch.device("meta"):
        enc = gc.create_model(name)
    mask = gc.random_mask(3, enc.mask_grid(32 if enc.final_stride <= 32 else enc.final_stride), 0.6)
    plan = enc.plan(mask)
    for i, stage in enumerate(plan.stages):
        T = len(stage.coords)
        assert T == 3 * int((~mask[0]).sum()) * (stage.grid // mask.shape[1]) ** 2
        for blk, wp in zip(enc.layers[i].blocks, stage.block_plans, strict=True):
            # gather and scatter are inverse; padding slots point at the zero row T
            assert torch.equal(wp.gather[wp.scatter], torch.arange(T))
            assert int((wp.gather == T).sum()) == wp.executed_tokens - T
            # two tokens share a group window iff Swin puts them in the same window and region
            ours = wp.slot_window.flatten()[wp.scatter]
            theirs = swin_window_and_region(
                stage.coords, stage.grid, blk.window_size[0], blk.shift_size[0]
            )
            assert torch.equal(ours[:, None] == ours[None], theirs[:, None] == theirs[None])
            # a window never spans two groups, and tokens keep their true coordinates
            group = wp.scatter // wp.group_size
            assert torch.equal(
                ours[:, None] == ours[None],
                (ours[:, None] == ours[None]) & (group[:, None] == group[None]),
            )
            assert torch.equal(wp.slot_hw.view(-1, 2)[wp.scatter], stage.coords[:, 1:])
        if stage.merge is not None:  # each parent's 4 children, in timm's (dh, dw) order
            prev = plan.stages[i - 1].coords[stage.merge]  # (T, 4, 3)
            expect = stage.coords[:, None, 1:] * 2 + torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])
            assert (
                torch.equal(prev[..., 1:], expect)
                and (prev[..., 0] == stage.coords[:, None, 0]).all()
            )
