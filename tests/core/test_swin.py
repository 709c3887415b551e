"""The Green Swin encoder against timm (dense) and against an independent masked reference."""

from __future__ import annotations

import pytest
import timm
import torch

import greenmim_core as gc
from greenmim_core.masking import random_mask

from .swin_reference import at_visible, reference_stages

pytestmark = pytest.mark.unit

MICRO = [n for n in gc.list_models() if n.startswith("swin_") and "micro" in n]


def _pair(name: str, seed: int = 0):
    """Our encoder with random weights (biases and tables non-zero) and timm loaded from its export."""
    torch.manual_seed(seed)
    enc = gc.create_model(name).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref = timm.create_model(enc.cfg.timm_arch, num_classes=0, **enc.cfg.model_args()).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    return enc, ref


@pytest.mark.parametrize("name", gc.list_models())
def test_registry_matches_timm_layout(name):
    """Every registered architecture has exactly timm's keys and shapes (built on meta)."""
    with torch.device("meta"):
        ours = gc.create_model(name).state_dict()
        cfg = gc.get_config(name)
        theirs = timm.create_model(cfg.timm_arch, num_classes=0, **cfg.model_args()).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize(
    "name", [*MICRO, "swin_tiny_patch4_window7_224", "swin_tiny_patch4_window14_224"]
)
def test_dense_and_all_visible_equal_timm(name):
    enc, ref = _pair(name)
    images = torch.randn(2, 3, enc.img_size, enc.img_size)
    nothing_masked = torch.zeros(2, *enc.mask_grid(enc.final_stride), dtype=torch.bool)
    with torch.no_grad():
        expected = ref.forward_features(images).flatten(1, 2)
        dense = enc(images)
        grouped = enc.forward_visible(images, nothing_masked)
    assert (dense - expected).abs().max() <= 1e-5
    assert (grouped - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", MICRO)
def test_reference_itself_matches_timm_when_nothing_is_masked(name):
    enc, ref = _pair(name)
    images = torch.randn(2, 3, enc.img_size, enc.img_size)
    with torch.no_grad():
        stages = reference_stages(enc, images, None)
        expected = ref.forward_intermediates(images, intermediates_only=True, norm=False)
    for ours, theirs in zip(stages, expected, strict=True):
        assert (ours - theirs.permute(0, 2, 3, 1)).abs().max() <= 1e-5


@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", MICRO)
def test_masked_equals_reference_at_every_stage(name, ratio, per_sample):
    enc, _ = _pair(name, seed=1)
    g = torch.Generator().manual_seed(int(ratio * 100) + per_sample)
    images = torch.randn(3, 3, enc.img_size, enc.img_size, generator=g)
    mask = random_mask(3, enc.mask_grid(enc.final_stride), ratio, per_sample, generator=g)
    with torch.no_grad():
        final, stages = enc.forward_visible(images, mask, return_stages=True)
        expected = reference_stages(enc, images, mask)
    for ours, dense in zip(stages, expected, strict=True):
        assert (ours - at_visible(dense, mask)).abs().max() <= 1e-5
    assert (final - enc.norm(at_visible(expected[-1], mask))).abs().max() <= 1e-5


def test_masked_equals_reference_swin_tiny_224():
    """A real-size model: Swin-T, window 7, 224 px, per-sample masks of 32 px units."""
    enc, _ = _pair("swin_tiny_patch4_window7_224", seed=2)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 224, 224, generator=g)
    mask = random_mask(2, enc.mask_grid(32), 0.75, generator=g)
    with torch.no_grad():
        _, stages = enc.forward_visible(images, mask, return_stages=True)
        expected = reference_stages(enc, images, mask)
    for ours, dense in zip(stages, expected, strict=True):
        assert (ours - at_visible(dense, mask)).abs().max() <= 1e-5


def test_larger_mask_unit_and_gradients_match_reference():
    """Mask unit of twice the final stride; parameter gradients equal the reference's."""
    enc, _ = _pair("swin_micro_patch2_window4_64", seed=4)
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = random_mask(2, enc.mask_grid(32), 0.5, generator=g)
    weights = torch.randn(2, 2 * 4, enc.num_features, generator=g)  # 2 visible units of 2x2 tokens

    (enc.forward_visible(images, mask, return_stages=True)[1][-1] * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
    enc.zero_grad()
    (at_visible(reference_stages(enc, images, mask)[-1], mask) * weights).sum().backward()
    for n, p in enc.named_parameters():
        if n.startswith("norm."):
            continue  # the final norm is outside the stages
        assert torch.allclose(ours[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_visible_tokens_are_row_major_and_ignore_masked_pixels():
    enc, _ = _pair("swin_micro_patch2_window4_64")
    mask = random_mask(2, enc.mask_grid(16), 0.75, generator=torch.Generator().manual_seed(0))
    images = torch.randn(2, 3, 64, 64)
    noisy = (
        images
        + 10
        * torch.randn_like(images)
        * mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None]
    )
    with torch.no_grad():
        assert torch.allclose(enc(images, mask), enc(noisy, mask), atol=1e-5)
    plan = enc.plan(mask)
    coords = plan.stages[-1].coords
    assert torch.equal(coords, (~mask).nonzero())


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="swin_tiny_patch4_window7_224"):
        gc.create_model("swin_huge")
    with pytest.raises(ValueError, match="depth"):
        gc.create_model("swin_micro_patch2_window4_64", depth=3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"img_size": 72}, "img_size 72"),
        ({"img_size": 48}, "window_size 4 does not divide stage 2 grid 6"),
        ({"window_size": 0}, "window_size must be positive"),
        ({"num_heads": (1, 2, 3, 8)}, "not divisible by 3 heads"),
    ],
)
def test_bad_configs_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        gc.get_config("swin_micro_patch2_window4_64", **overrides)


def test_bad_mask_unit_and_mask_shape():
    enc = gc.create_model("swin_micro_patch2_window4_64")
    with pytest.raises(ValueError, match="mask unit 8 is not a multiple"):
        enc.mask_grid(8)
    with pytest.raises(ValueError, match="img_size 64 is not divisible by mask unit 48"):
        enc.mask_grid(48)
    uneven = torch.zeros(2, 4, 4, dtype=torch.bool)
    uneven[0, 0, :2] = True
    with pytest.raises(ValueError, match="same, nonzero number of visible units"):
        enc.plan(uneven)
