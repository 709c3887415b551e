"""Sparse convolutions on visible tokens against F.conv2d on the zero-filled dense image."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greenmim_core.sparse_conv import (
    plan_strided,
    plan_submanifold,
    resolve_backend,
    strided_conv,
    submanifold_depthwise,
)

pytestmark = pytest.mark.unit

HAS_SPCONV = importlib.util.find_spec("spconv") is not None
BACKENDS = [
    "torch",
    pytest.param("spconv", marks=pytest.mark.skipif(not HAS_SPCONV, reason="no spconv")),
]


def _tokens(B, C, H, W, ratio, seed, block=1):
    """Random dense features and a random visibility pattern in ``block x block`` units."""
    g = torch.Generator().manual_seed(seed)
    units = torch.rand(B, -(-H // block), -(-W // block), generator=g) >= ratio
    visible = units.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :H, :W]
    dense = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    coords = visible.nonzero()
    x = dense.permute(0, 2, 3, 1)[visible].clone().requires_grad_(True)  # (T, C) row-major
    return x, coords, visible


def _zero_filled(x_tc, visible, C):
    B, H, W = visible.shape
    dense = x_tc.new_zeros(B, H, W, C)
    dense[visible] = x_tc
    return dense.permute(0, 3, 1, 2)


def _grads(out, params, weights):
    return torch.autograd.grad((out * weights).sum(), params)


@pytest.mark.parametrize(
    ("B", "C", "H", "W", "ratio"), [(2, 4, 8, 8, 0.5), (3, 5, 7, 11, 0.7), (1, 3, 5, 5, 0.0)]
)
def test_submanifold_depthwise_equals_dense_conv(B, C, H, W, ratio):
    x, coords, visible = _tokens(B, C, H, W, ratio, seed=H * W)
    conv = nn.Conv2d(C, C, 3, 1, 1, groups=C).double()
    with torch.no_grad():
        conv.bias.normal_()
    out = submanifold_depthwise(conv, x, plan_submanifold(coords, (B, H, W)))
    ref_dense = F.conv2d(_zero_filled(x, visible, C), conv.weight, conv.bias, padding=1, groups=C)
    ref = ref_dense.permute(0, 2, 3, 1)[visible]
    assert (out - ref).abs().max() <= 1e-5
    w = torch.randn_like(out)
    params = [x, conv.weight, conv.bias]
    for a, b in zip(_grads(out, params, w), _grads(ref, params, w), strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("B", "Ci", "Co", "H", "W", "s", "ratio", "block"),
    [
        (2, 4, 6, 8, 8, 2, 0.5, 1),  # windows straddle visible and masked sites
        (3, 3, 5, 12, 12, 4, 0.6, 2),
        (2, 5, 3, 9, 10, 3, 0.4, 1),  # ragged border: dropped like nn.Conv2d drops it
        (2, 4, 4, 16, 16, 8, 0.75, 8),  # mask units aligned with the windows (Twins' case)
    ],
)
def test_strided_conv_equals_dense_conv(backend, B, Ci, Co, H, W, s, ratio, block):
    x, coords, visible = _tokens(B, Ci, H, W, ratio, seed=H + s, block=block)
    x32 = x.detach().float().requires_grad_(True)  # spconv runs in float32
    conv = nn.Conv2d(Ci, Co, s, s)
    with torch.no_grad():
        conv.bias.normal_()
    plan = plan_strided(coords, (B, H, W), s)
    out = strided_conv(conv, x32, plan, backend=backend)

    dense_in = _zero_filled(x32, visible, Ci)
    active = F.max_pool2d(visible[:, None].float(), s, s)[:, 0] > 0  # >= 1 visible input
    ref = conv(dense_in).permute(0, 2, 3, 1)[active]
    assert torch.equal(plan.out_coords, active.nonzero())
    assert (out - ref).abs().max() <= 1e-5
    w = torch.randn_like(out)
    params = [x32, conv.weight, conv.bias]
    for a, b in zip(_grads(out, params, w), _grads(ref, params, w), strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.skipif(not HAS_SPCONV, reason="no spconv")
def test_backends_agree():
    x, coords, _ = _tokens(4, 8, 16, 16, 0.6, seed=7, block=2)
    conv = nn.Conv2d(8, 16, 4, 4)
    plan = plan_strided(coords, (4, 16, 16), 4)
    a = strided_conv(conv, x.detach().float(), plan, backend="torch")
    b = strided_conv(conv, x.detach().float(), plan, backend="spconv")
    assert (a - b).abs().max() <= 1e-5


def test_padding_by_sample_lists_each_samples_coarse_sites():
    _, coords, visible = _tokens(3, 1, 8, 8, 0.6, seed=3)
    plan = plan_strided(coords, (3, 8, 8), 4)
    for b in range(3):
        mine = plan.out_coords[plan.pad_index[b][plan.pad_valid[b]]]
        assert torch.equal(mine, plan.out_coords[plan.out_coords[:, 0] == b])
    assert int(plan.pad_valid.sum()) == len(plan.out_coords)


def test_backend_choice_and_errors():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("spconv", torch.device("cpu")) == "spconv"
    with pytest.raises(ValueError, match="unknown sparse conv backend 'cudnn'"):
        resolve_backend("cudnn", torch.device("cpu"))
    conv = nn.Conv2d(2, 2, 3, 2)
    _, coords, _ = _tokens(1, 2, 4, 4, 0.0, seed=0)
    with pytest.raises(ValueError, match="does not match the plan's stride 2"):
        strided_conv(conv, torch.zeros(len(coords), 2), plan_strided(coords, (1, 4, 4), 2))


def test_missing_spconv_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_spconv(name, *args, **kwargs):
        if name.startswith("spconv"):
            raise ImportError("No module named 'spconv'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spconv)
    _, coords, _ = _tokens(1, 2, 4, 4, 0.0, seed=0)
    conv = nn.Conv2d(2, 2, 2, 2)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[spconv\]'"):
        strided_conv(
            conv, torch.zeros(len(coords), 2), plan_strided(coords, (1, 4, 4), 2), "spconv"
        )
