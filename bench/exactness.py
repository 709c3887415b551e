"""Max abs differences of the Green Swin against timm (dense) and a masked dense reference.

    python bench/exactness.py

Dense: our encoder's weights exported to ``timm.create_model(arch, **model_args)`` (strict
load), features compared with our dense forward and with our grouped visible-token path under
an all-visible mask. Masked: per-sample random masks, every stage's visible tokens compared
with the independent dense reference in ``tests/core/swin_reference.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch

import greenmim_core as gc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))
from swin_reference import at_visible, reference_stages  # noqa: E402


def randomized(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = gc.create_model(name).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return enc


def main() -> None:
    print(
        f"{'model':<32} {'dense vs timm':>14} {'grouped vs timm':>16} {'masked vs ref (worst stage)':>28}"
    )
    for name in (
        "swin_micro_patch2_window4_64",
        "swin_micro_patch2_window8_64",
        "swin_tiny_patch4_window7_224",
        "swin_tiny_patch4_window14_224",
    ):
        enc = randomized(name)
        ref = timm.create_model(enc.cfg.timm_arch, num_classes=0, **enc.cfg.model_args()).eval()
        ref.load_state_dict(enc.state_dict(), strict=True)
        g = torch.Generator().manual_seed(1)
        images = torch.randn(2, 3, enc.img_size, enc.img_size, generator=g)
        grid = enc.mask_grid(max(32, enc.final_stride))
        with torch.no_grad():
            expected = ref.forward_features(images).flatten(1, 2)
            dense = (enc(images) - expected).abs().max().item()
            nothing = torch.zeros(2, *grid, dtype=torch.bool)
            grouped = (enc.forward_visible(images, nothing) - expected).abs().max().item()
            mask = gc.random_mask(2, grid, 0.75 if grid[0] > 2 else 0.5, generator=g)
            _, stages = enc.forward_visible(images, mask, return_stages=True)
            masked = max(
                (ours - at_visible(d, mask)).abs().max().item()
                for ours, d in zip(stages, reference_stages(enc, images, mask), strict=True)
            )
        print(f"{name:<32} {dense:>14.2e} {grouped:>16.2e} {masked:>28.2e}")


if __name__ == "__main__":
    main()
