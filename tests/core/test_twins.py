"""The Green Twins encoder against timm (dense) and against an independent masked reference."""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch

import greenmim_core as gc
from greenmim_core.masking import random_mask
from greenmim_core.mim import GreenMIM, MIMConfig
from greenmim_core.twins import GreenTwins

from .swin_reference import at_visible
from .test_mim import _reference_loss
from .twins_reference import reference_stages

pytestmark = pytest.mark.unit

TWINS = [n for n in gc.list_models() if n.startswith("twins_")]
MICRO = [n for n in TWINS if "micro" in n]
REAL = [n for n in TWINS if "micro" not in n]


def _perturb(enc: GreenTwins, seed: int) -> GreenTwins:
    """Random non-zero biases and norms, so that no parameter's effect is hidden."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return enc


def _pair(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    enc = _perturb(gc.create_model(name, **overrides).eval(), seed)
    ref = timm.create_model(enc.cfg.timm_arch, num_classes=0, **enc.cfg.model_args()).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    return enc, ref


def _check_stages(enc, images, mask, tol=1e-5):
    with torch.no_grad():
        final, stages = enc.forward_visible(images, mask, return_stages=True)
        expected = reference_stages(enc, images, mask)
    for ours, dense in zip(stages, expected, strict=True):
        assert (ours - at_visible(dense, mask)).abs().max() <= tol
    assert (final - enc.norm(at_visible(expected[-1], mask))).abs().max() <= tol


@pytest.mark.parametrize("name", TWINS)
def test_every_variant_builds_like_timm_and_runs_masked(name):
    """timm's keys and shapes at the registered size (meta); a small masked forward runs and
    equals the dense forward where nothing is masked."""
    cfg = gc.get_config(name)
    with torch.device("meta"):
        ours = GreenTwins(cfg).state_dict()
        theirs = timm.create_model(cfg.timm_arch, num_classes=0, **cfg.model_args()).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}

    # real sizes: the same widths, heads and ratios, at 64 px with two blocks per stage
    small = {}
    if "micro" not in name:
        small = {"img_size": 64, "wss": cfg.wss and (2, 2, 2, 2), "depths": (2, 2, 2, 2)}
    with torch.device("meta"):  # skip timm's weight init: random weights are all we need
        enc = gc.create_model(name, **small).eval()
    enc = enc.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in enc.named_parameters():
            is_scale = p.ndim == 1 and "norm" in n and n.endswith("weight")
            p.normal_(1.0 if is_scale else 0.0, 0.02, generator=g)
    images = torch.randn(2, 3, enc.img_size, enc.img_size)
    grid = enc.mask_grid(enc.final_stride)
    with torch.no_grad():
        dense = enc(images)
        all_visible = enc(images, torch.zeros(2, *grid, dtype=torch.bool))
        masked = enc(images, random_mask(2, grid, 0.5))
    assert (dense - all_visible).abs().max() <= 1e-4
    assert masked.shape == (2, grid[0] * grid[1] // 2, cfg.num_features)
    assert torch.isfinite(masked).all()


@pytest.mark.parametrize("name", [*MICRO, "twins_svt_small"])
def test_dense_and_all_visible_equal_timm(name):
    enc, ref = _pair(name)
    images = torch.randn(1 if name in REAL else 2, 3, enc.img_size, enc.img_size)
    nothing_masked = torch.zeros(len(images), *enc.mask_grid(enc.final_stride), dtype=torch.bool)
    with torch.no_grad():
        expected = ref.forward_features(images)
        dense = enc(images)
        visible_only = enc.forward_visible(images, nothing_masked)
    assert (dense - expected).abs().max() <= 1e-5
    assert (visible_only - expected).abs().max() <= 1e-5


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
@pytest.mark.parametrize("ratio", [0.25, 0.75])
@pytest.mark.parametrize("name", MICRO)
def test_masked_equals_reference_at_every_stage(name, ratio, per_sample):
    enc, _ = _pair(name, seed=1)
    g = torch.Generator().manual_seed(int(ratio * 100) + per_sample)
    images = torch.randn(3, 3, enc.img_size, enc.img_size, generator=g)
    mask = random_mask(3, enc.mask_grid(enc.final_stride), ratio, per_sample, generator=g)
    _check_stages(enc, images, mask)


def test_reduction_windows_straddling_mask_units():
    """sr windows larger than a mask unit: coarse sites are partly visible and their number
    differs between samples, so keys are padded per sample."""
    enc, _ = _pair("twins_pcpvt_micro", seed=2, sr_ratios=(16, 8, 4, 1))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 64, 64, generator=g)
    mask = random_mask(4, enc.mask_grid(16), 0.75, generator=g)
    reduce = enc.plan(mask).stages[0].reduce
    assert not bool(reduce.pad_valid.all())  # the padding path is exercised
    _check_stages(enc, images, mask)


def test_masked_equals_reference_svt_small_224():
    """A real-size model: Twins-SVT-S at 224 px, per-sample masks of 32 px units."""
    enc, _ = _pair("twins_svt_small", seed=3)
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 224, 224, generator=g)
    _check_stages(enc, images, random_mask(2, enc.mask_grid(32), 0.75, generator=g))


@pytest.mark.parametrize("name", MICRO)
def test_gradients_match_reference(name):
    """Mask unit of twice the final stride; every parameter gradient equals the reference's
    (float64, so that the tolerance measures the method, not float32 rounding)."""
    enc = _pair(name, seed=4)[0].double()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    mask = random_mask(2, enc.mask_grid(32), 0.5, generator=g)
    # 2 visible units of 2x2 final tokens
    weights = torch.randn(2, 2 * 4, enc.num_features, generator=g, dtype=torch.float64)

    (enc.forward_visible(images, mask) * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in enc.named_parameters()}
    enc.zero_grad()
    (enc.norm(at_visible(reference_stages(enc, images, mask)[-1], mask)) * weights).sum().backward()
    for n, p in enc.named_parameters():
        assert (ours[n] - p.grad).abs().max() <= 1e-5, n


@pytest.mark.skipif(importlib.util.find_spec("spconv") is None, reason="no spconv")
def test_spconv_backend_gives_the_same_encoder_output():
    enc, _ = _pair("twins_svt_micro")
    images = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, enc.mask_grid(16), 0.75)
    with torch.no_grad():
        enc.sparse_backend = "torch"
        a = enc(images, mask)
        enc.sparse_backend = "spconv"
        b = enc(images, mask)
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("name", MICRO)
def test_greenmim_trains_a_twins_encoder(name):
    torch.manual_seed(0)
    enc = _perturb(gc.create_model(name), 6)
    model = GreenMIM(enc, MIMConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4))
    images = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(7))
    loss, pred, _ = model(images, mask)
    assert torch.isfinite(loss)
    expected = _reference_loss(images, pred, mask, model.unit, model.stride, True)
    assert (loss - expected).abs() <= 1e-5
    with torch.no_grad():  # the same loss with the reference encoder in place of ours
        latent = enc.norm(at_visible(reference_stages(enc, images, mask)[-1], mask))
        ref_pred = model.forward_decoder(latent, model.token_mask(mask))
        ref_loss = model.forward_loss(images, ref_pred, model.token_mask(mask))
    assert (loss - ref_loss).abs() <= 1e-5
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"img_size": 72}, "img_size 72"),
        ({"wss": (4, 4, 3, 4)}, "window size 3 must be >= 2 and divide stage 2 grid 8"),
        ({"sr_ratios": (8, 4, 3, 1)}, "sr_ratio 3 does not divide stage 2 grid 8"),
        ({"num_heads": (1, 2, 5, 4)}, "stage 2 width 48 not divisible by 5 heads"),
        ({"depths": (2, 2, 2)}, "must have one entry per stage"),
        ({"drop_path_rate": 1.0}, "drop_path_rate must be in"),
    ],
)
def test_bad_configs_name_the_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        gc.get_config("twins_svt_micro", **overrides)


def test_bad_mask_unit_and_mask_shape():
    enc = gc.create_model("twins_svt_micro")
    with pytest.raises(ValueError, match="mask unit 8 is not a multiple"):
        enc.mask_grid(8)
    uneven = torch.zeros(2, 4, 4, dtype=torch.bool)
    uneven[0, 0, :2] = True
    with pytest.raises(ValueError, match="same, nonzero number of visible units"):
        enc.plan(uneven)
