"""The two attention cores of the visible path (SDPA with an additive bias, FlexAttention) agree,
and plans made ahead (pinned, moved asynchronously) give the same encoder output."""

from __future__ import annotations

import pytest
import torch

from greenmim_core.attention import attention_layout, group_attention, resolve_backend
from greenmim_core.masking import random_mask
from greenmim_core.mim import MIMConfig
from greenmim_core.planner import MaskPlanner

from .swin_reference import at_visible, reference_stages
from .test_swin import MICRO, _pair

pytestmark = pytest.mark.unit

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_backend_is_flex_on_cuda_and_sdpa_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == "flex"
    assert resolve_backend("flex", torch.device("cpu")) == "flex"
    with pytest.raises(ValueError, match="'triton'"):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("ratio", [0.25, 0.75])
@pytest.mark.parametrize("name", MICRO)
def test_flex_forward_equals_sdpa_in_every_block(name, ratio):
    """Every block's window partition (regular and shifted), on random tokens."""
    enc, _ = _pair(name, seed=6)
    g = torch.Generator().manual_seed(7)
    mask = random_mask(3, enc.mask_grid(enc.final_stride), ratio, generator=g)
    plan = enc.plan(mask)
    checked = 0
    with torch.no_grad():
        for layer, stage in zip(enc.layers, plan.stages, strict=True):
            for blk, wplan in zip(layer.blocks, stage.block_plans, strict=True):
                x = torch.randn(len(stage.coords), blk.attn.qkv.in_features, generator=g)
                sdpa = group_attention(blk.attn, x, wplan, backend="sdpa")
                flex = group_attention(
                    blk.attn, x, wplan, attention_layout(wplan, "flex"), backend="flex"
                )
                assert (flex - sdpa).abs().max() <= 1e-5
                checked += 1
    assert checked == sum(len(layer.blocks) for layer in enc.layers)


def test_flex_encoder_forward_equals_masked_reference():
    enc, _ = _pair("swin_micro_patch2_window4_64", seed=8)
    enc.attention_backend = "flex"
    g = torch.Generator().manual_seed(9)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = random_mask(2, enc.mask_grid(enc.final_stride), 0.75, generator=g)
    with torch.no_grad():
        _, stages = enc.forward_visible(images, mask, return_stages=True)
        expected = reference_stages(enc, images, mask)
    for ours, dense in zip(stages, expected, strict=True):
        assert (ours - at_visible(dense, mask)).abs().max() <= 1e-5


def test_flex_backward_on_cpu_is_not_offered():
    pytest.skip(
        "torch 2.14 FlexAttention has no backward on CPU (forward only); the flex backward is "
        "checked against SDPA by test_flex_backward_equals_sdpa_on_cuda and bench/gpu_check.sh"
    )


def test_premade_plan_gives_the_same_encoder_output():
    """A plan from ``MaskPlanner`` (what the data loader makes) is the model's own plan."""
    enc, _ = _pair("swin_micro_patch2_window8_64", seed=10)
    planner = MaskPlanner(enc.cfg, MIMConfig(decoder_dim=32, decoder_depth=1, decoder_heads=4))
    mask, plan = planner(3, torch.Generator().manual_seed(11))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(
            enc.forward_visible(images, mask, plan), enc.forward_visible(images, mask)
        )


@CUDA
@pytest.mark.parametrize("name", MICRO)
def test_flex_backward_equals_sdpa_on_cuda(name):
    enc, _ = _pair(name, seed=12)
    enc = enc.cuda()
    g = torch.Generator().manual_seed(13)
    images = torch.randn(2, 3, 64, 64, generator=g).cuda()
    mask = random_mask(2, enc.mask_grid(enc.final_stride), 0.75, generator=g)
    plan = enc.plan(mask).pin_memory().to(torch.device("cuda"))
    grads, outs = {}, {}
    for backend in ("sdpa", "flex"):
        enc.zero_grad()
        enc.attention_backend = backend
        out = enc.forward_visible(images, mask, plan)
        out.square().sum().backward()
        outs[backend] = out.detach()
        grads[backend] = {n: p.grad.clone() for n, p in enc.named_parameters()}
    assert (outs["flex"] - outs["sdpa"]).abs().max() <= 1e-4
    for n, grad in grads["sdpa"].items():
        assert torch.allclose(grads["flex"][n], grad, atol=1e-4, rtol=1e-3), n


@CUDA
def test_masked_equals_reference_on_cuda_with_pinned_plan():
    enc, _ = _pair("swin_micro_patch2_window4_64", seed=14)
    enc = enc.cuda()
    g = torch.Generator().manual_seed(15)
    images = torch.randn(2, 3, 64, 64, generator=g)
    mask = random_mask(2, enc.mask_grid(enc.final_stride), 0.5, generator=g)
    plan = enc.plan(mask).pin_memory()
    with torch.no_grad():
        _, stages = enc.forward_visible(images.cuda(), mask, plan, return_stages=True)
        expected = reference_stages(enc.cpu(), images, mask)
    for ours, dense in zip(stages, expected, strict=True):
        assert (ours.cpu() - at_visible(dense, mask)).abs().max() <= 1e-4
