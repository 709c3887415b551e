"""Convolutions on visible tokens only (Twins' position encoding and strided reductions).

Tokens live as a flat ``(T, C)`` array with integer coordinates ``coords_t3`` (T, 3) long rows
``(sample, y, x)`` on a ``(B, H, W)`` grid, row-major (sorted by ``(sample, y, x)``), as
``visible_bhw.nonzero()`` returns them. Sites without a token hold zeros: the result equals
``F.conv2d`` on the zero-filled dense image, read at the active output sites.

* ``submanifold_depthwise`` (3x3 depthwise, stride 1, padding 1: Twins' PEG) outputs at the
  input sites only.
* ``strided_conv`` (kernel == stride: the ``sr`` reduction of global sub-sampled attention and
  the patch embeddings between stages) outputs at every coarse site with at least one input.

Both follow a frozen plan of index tables made from coordinates by ``plan_submanifold`` and
``plan_strided`` (searchsorted over sorted site keys; no dense grid). Weights are ordinary
``nn.Conv2d`` parameters (timm's layout). Backends: ``"torch"`` (exact gather + matmul) and
``"spconv"`` (``SparseConv2d``; native algorithm on CPU); ``"auto"`` picks spconv on CUDA when
it is installed. spconv has no depthwise convolution, so the depthwise path is torch in both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "torch", "spconv")
_SPCONV_MISSING = (
    "the 'spconv' backend needs the spconv package; install the extra: pip install -e '.[spconv]'"
)


def _keys(coords_t3: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Row-major site keys; sorted whenever ``coords_t3`` is."""
    b, y, x = coords_t3.unbind(1)
    return (b * height + y) * width + x


@dataclass(frozen=True)
class SubmanifoldPlan:
    """neighbors: (T, k*k) long, token at each kernel offset (row-major); ``T`` = no token."""

    kernel: int
    neighbors: torch.Tensor

    def to(self, device: torch.device) -> SubmanifoldPlan:
        return replace(self, neighbors=self.neighbors.to(device, non_blocking=True))


@dataclass(frozen=True)
class StridedPlan:
    """A kernel == stride convolution from ``in_coords`` to the coarse sites it reaches.

    in_coords:  (T_in, 3) long, on the fine grid ``in_shape`` (B, H, W).
    out_coords: (T_out, 3) long, coarse sites with >= 1 input token, row-major.
    gather:     (T_out, s*s) long, input token at each kernel offset (row-major); ``T_in`` = none.
    pad_index:  (B, M) long, each sample's output tokens left-aligned, ``T_out`` as padding,
                M = the largest per-sample count (coarse counts may differ between samples).
    pad_valid:  (B, M) bool, False at padding.
    """

    stride: int
    in_shape: tuple[int, int, int]
    in_coords: torch.Tensor
    out_coords: torch.Tensor
    gather: torch.Tensor
    pad_index: torch.Tensor
    pad_valid: torch.Tensor

    @property
    def out_shape(self) -> tuple[int, int, int]:
        B, H, W = self.in_shape
        return B, H // self.stride, W // self.stride

    def to(self, device: torch.device) -> StridedPlan:
        fields = ("in_coords", "out_coords", "gather", "pad_index", "pad_valid")
        return replace(self, **{f: getattr(self, f).to(device, non_blocking=True) for f in fields})


def plan_submanifold(
    coords_t3: torch.Tensor, shape_bhw: tuple[int, int, int], kernel: int = 3
) -> SubmanifoldPlan:
    """Neighbour table of a ``kernel x kernel`` stride-1 'same' convolution at the given sites."""
    _, H, W = shape_bhw
    T = len(coords_t3)
    keys = _keys(coords_t3, H, W)
    r = kernel // 2
    d = torch.arange(-r, kernel - r)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    ny = coords_t3[:, 1:2] + dy.reshape(1, -1)  # (T, k*k)
    nx = coords_t3[:, 2:3] + dx.reshape(1, -1)
    inside = (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
    nkeys = (coords_t3[:, :1] * H + ny) * W + nx
    pos = torch.searchsorted(keys, nkeys).clamp_(max=max(T - 1, 0))
    found = inside & (keys[pos] == nkeys) if T else inside
    return SubmanifoldPlan(kernel, torch.where(found, pos, T))


def plan_strided(
    coords_t3: torch.Tensor, shape_bhw: tuple[int, int, int], stride: int
) -> StridedPlan:
    """Index tables of a kernel == stride convolution (no padding; a ragged border is dropped,
    as ``nn.Conv2d`` drops it)."""
    B, H, W = shape_bhw
    s = stride
    Ho, Wo = H // s, W // s
    b, y, x = coords_t3.unbind(1)
    keep = (y < Ho * s) & (x < Wo * s)
    in_index = keep.nonzero().squeeze(1)
    b, y, x = b[keep], y[keep], x[keep]
    out_keys, out_of_token = torch.unique((b * Ho + y // s) * Wo + x // s, return_inverse=True)
    T_in, T_out = len(coords_t3), len(out_keys)
    gather = torch.full((T_out, s * s), T_in, dtype=torch.long)
    gather[out_of_token, (y % s) * s + x % s] = in_index
    out_coords = torch.stack([out_keys // (Ho * Wo), out_keys // Wo % Ho, out_keys % Wo], 1)

    counts = torch.bincount(out_coords[:, 0], minlength=B)
    M = int(counts.max()) if B else 0
    starts = counts.cumsum(0) - counts
    rank = torch.arange(T_out) - starts[out_coords[:, 0]]
    pad_index = torch.full((B, M), T_out, dtype=torch.long)
    pad_index[out_coords[:, 0], rank] = torch.arange(T_out)
    pad_valid = pad_index < T_out
    return StridedPlan(s, (B, H, W), coords_t3, out_coords, gather, pad_index, pad_valid)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> spconv on CUDA if importable, torch otherwise; validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown sparse conv backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        cuda = torch.device(device).type == "cuda"
        return "spconv" if cuda and importlib.util.find_spec("spconv") else "torch"
    return backend


def _with_zero_row(x_tc: torch.Tensor) -> torch.Tensor:
    return torch.cat([x_tc, x_tc.new_zeros(1, x_tc.shape[1])])


def submanifold_depthwise(
    conv: nn.Conv2d, x_tc: torch.Tensor, plan: SubmanifoldPlan
) -> torch.Tensor:
    """Depthwise ``conv`` (C, 1, k, k) at the input sites: (T, C) -> (T, C), bias included."""
    weight = conv.weight.flatten(1).t()  # (k*k, C), kernel offsets row-major
    out = torch.einsum("tkc,kc->tc", _with_zero_row(x_tc)[plan.neighbors], weight)
    return out if conv.bias is None else out + conv.bias


def strided_conv(
    conv: nn.Conv2d, x_tc: torch.Tensor, plan: StridedPlan, backend: str = "auto"
) -> torch.Tensor:
    """``conv`` with kernel == stride on tokens: (T_in, C_in) -> (T_out, C_out) at ``out_coords``."""
    if conv.kernel_size != (plan.stride, plan.stride) or conv.stride != conv.kernel_size:
        raise ValueError(
            f"conv kernel {conv.kernel_size} / stride {conv.stride} does not match the plan's "
            f"stride {plan.stride}"
        )
    if resolve_backend(backend, x_tc.device) == "spconv":
        return _strided_spconv(conv, x_tc, plan)
    patches = _with_zero_row(x_tc)[plan.gather].flatten(1)  # (T_out, s*s*C_in)
    weight = conv.weight.permute(0, 2, 3, 1).flatten(1)  # (C_out, s*s*C_in), same order
    return F.linear(patches, weight, conv.bias)


def _strided_spconv(conv: nn.Conv2d, x_tc: torch.Tensor, plan: StridedPlan) -> torch.Tensor:
    try:
        import spconv.pytorch as spconv
    except ImportError as err:
        raise ImportError(_SPCONV_MISSING) from err
    s = plan.stride
    B, H, W = plan.in_shape
    # the layer only carries spconv's settings; the weights stay the nn.Conv2d's (timm layout),
    # converted to spconv's KRSC layout per call so that gradients flow back to them
    layer = _spconv_layer(conv.in_channels, conv.out_channels, s, x_tc.device.type == "cpu")
    # spconv reads raw memory: ``nonzero()`` may hand out column-major coordinates
    indices = plan.in_coords.to(torch.int32).contiguous()
    sparse = spconv.SparseConvTensor(x_tc.contiguous(), indices, [H, W], B)
    weight = conv.weight.permute(0, 2, 3, 1).contiguous()  # (C_out, s, s, C_in)
    out = layer._conv_forward(layer.training, sparse, weight, conv.bias)
    # spconv lists its output sites in its own order: sort them row-major like ``out_coords``
    order = _keys(out.indices.long(), H // s, W // s).argsort()
    return out.features[order]


@lru_cache(maxsize=64)
def _spconv_layer(in_channels: int, out_channels: int, stride: int, cpu: bool) -> nn.Module:
    import spconv.pytorch as spconv

    algo = spconv.ConvAlgo.Native if cpu else spconv.ConvAlgo.MaskImplicitGemm
    return spconv.SparseConv2d(
        in_channels, out_channels, stride, stride, bias=False, algo=algo
    ).requires_grad_(False)
