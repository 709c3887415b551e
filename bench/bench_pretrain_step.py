"""One GreenMIM pretraining step against a dense SimMIM-style Swin, same model and batch.

Prints three tables:
1. the encoder plan for Swin-B 224 at ``--plan-batch`` (default 128) with per-sample masks:
   per stage and window partition, tokens the attention core executes (padding included)
   vs visible tokens vs the dense token count, and the time of the whole plan per step
   (planner + index tensors for all stages);
2. forward+backward time and bytes saved for backward of one training step, GreenMIM
   (visible-only encoder + light decoder) vs SimMIM-style (timm Swin on all tokens with a
   mask token, linear pixel head), at ``--batch`` on this machine, with ratios.

    python bench/bench_pretrain_step.py [--model swin_base_patch4_window7_224] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import greenmim_core as gc
from greenmim_core.mim import GreenMIM, MIMConfig


class SimMIMSwin(nn.Module):
    """SimMIM baseline: masked patches replaced by a mask token, dense encoder, linear pixel head."""

    def __init__(self, encoder, unit: int):
        super().__init__()
        self.encoder, self.unit, self.stride = encoder, unit, encoder.final_stride
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, encoder.embed_dim))
        self.head = nn.Linear(encoder.num_features, self.stride**2 * 3)

    def forward(self, images, mask):
        x = self.encoder.patch_embed(images)  # (B, H, W, C)
        scale = x.shape[1] // mask.shape[1]
        w = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)[..., None].to(x.dtype)
        x = x * (1 - w) + self.mask_token * w
        x = self.encoder.norm(self.encoder.layers(x))
        pred = self.head(x)  # (B, h, w, s*s*3)
        B, h, wd, _ = pred.shape
        s = self.stride
        rec = pred.view(B, h, wd, s, s, 3).permute(0, 5, 1, 3, 2, 4).reshape(images.shape)
        pix = mask.repeat_interleave(self.unit, 1).repeat_interleave(self.unit, 2)[:, None]
        return ((rec - images).abs() * pix).sum() / (pix.sum() * 3)


def saved_bytes(fn, exclude: nn.Module | None = None) -> int:
    """Bytes of distinct tensors autograd saves for backward while ``fn`` runs; with
    ``exclude``, that module's parameters are not counted (activations only)."""
    seen: dict[tuple, int] = {}
    skip = (
        set() if exclude is None else {p.untyped_storage().data_ptr() for p in exclude.parameters()}
    )

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key[0] not in skip:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    out.backward()
    return total


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plan_table(name: str, batch: int, runs: int) -> None:
    with torch.device("meta"):
        enc = gc.create_model(name)  # the plan needs no weights
    mim_grid = enc.mask_grid(enc.final_stride)
    masks = [gc.random_mask(batch, mim_grid, 0.75) for _ in range(runs)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a data-loader worker, where plans can be made ahead
    t = [timed(lambda m=m: enc.plan(m), 1) for m in masks]
    torch.set_num_threads(threads)
    plan = enc.plan(masks[0])
    print(f"\n{name}, batch {batch}, per-sample masks, 75% of 32 px units masked")
    print(
        f"{'stage':>5} {'shift':>5} {'g':>4} {'groups':>6} {'executed':>9} {'visible':>8} {'dense':>8} {'exec/vis':>8}"
    )
    for i, stage in enumerate(plan.stages):
        visible = len(stage.coords)
        dense = batch * stage.grid**2
        for blk, wplan in {
            id(p): (b, p) for b, p in zip(enc.layers[i].blocks, stage.block_plans, strict=True)
        }.values():
            print(
                f"{i + 1:>5} {blk.shift_size[0]:>5} {wplan.group_size:>4} {wplan.num_groups:>6} "
                f"{wplan.executed_tokens:>9} {visible:>8} {dense:>8} {wplan.executed_tokens / visible:>8.4f}"
            )
    print(
        f"whole plan per step (all stages, index tensors included, 1 thread): "
        f"median {1e3 * statistics.median(t):.1f} ms, min {1e3 * min(t):.1f} ms"
    )


def step_table(name: str, batch: int, runs: int) -> None:
    torch.manual_seed(0)
    green = GreenMIM(gc.create_model(name), MIMConfig())
    simmim = SimMIMSwin(gc.create_model(name), unit=32)
    images = torch.randn(batch, 3, green.encoder.img_size, green.encoder.img_size)
    mask = green.random_mask(batch)

    def green_step():
        loss, _, _ = green(images, mask)
        return loss

    def simmim_step():
        return simmim(images, mask)

    rows = []
    for label, fn, model in (
        ("SimMIM dense", simmim_step, simmim),
        ("GreenMIM", green_step, green),
    ):
        bytes_ = saved_bytes(fn)
        model.zero_grad(set_to_none=True)

        def step(fn=fn, model=model):
            fn().backward()
            model.zero_grad(set_to_none=True)

        step()  # warm-up
        rows.append((label, timed(step, runs), bytes_))
    base_t, base_b = rows[0][1], rows[0][2]
    print(
        f"\n{name}, batch {batch}, one training step (forward + backward) on {torch.get_num_threads()} CPU threads"
    )
    print(f"{'model':<14} {'step s':>8} {'speed-up':>8} {'saved MiB':>10} {'mem ratio':>9}")
    for label, t, b in rows:
        print(f"{label:<14} {t:>8.3f} {base_t / t:>7.2f}x {b / 2**20:>10.1f} {b / base_b:>9.3f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--plan-batch", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    plan_table(args.model, args.plan_batch, max(args.runs, 10))
    step_table(args.model, args.batch, args.runs)


if __name__ == "__main__":
    main()
