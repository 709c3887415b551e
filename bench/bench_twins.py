"""One GreenMIM pretraining step of Green Twins against a dense SimMIM-style Twins.

    python bench/bench_twins.py [--model twins_svt_small] [--batch 8] [--runs 3]

Same batch, same per-sample mask (75 % of 32 px units). The SimMIM-style baseline is timm's
Twins on all tokens with a mask token replacing masked patch embeddings and a linear pixel
head. Step times are medians of interleaved runs (forward + backward); saved bytes are the
distinct tensors autograd keeps for backward, parameters excluded. A second table gives, per
stage, the tokens each part of the Green encoder executes against the visible and dense counts.
``--encoders`` adds the two encoders alone (ratios against the dense encoder).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_pretrain_step import saved_bytes, timed
from torch import nn

import greenmim_core as gc
from greenmim_core.mim import GreenMIM, MIMConfig


class SimMIMTwins(nn.Module):
    """SimMIM baseline: masked patch embeddings replaced by a mask token, dense timm Twins,
    linear pixel head, L1 loss on masked pixels."""

    def __init__(self, encoder, unit: int):
        super().__init__()
        self.encoder, self.unit, self.stride = encoder, unit, encoder.final_stride
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dims[0]))
        self.head = nn.Linear(encoder.num_features, self.stride**2 * 3)

    def forward(self, images, mask):
        enc, B = self.encoder, images.shape[0]
        x, last = images, len(enc.blocks) - 1
        for i, (embed, drop, blocks, peg) in enumerate(
            zip(enc.patch_embeds, enc.pos_drops, enc.blocks, enc.pos_block, strict=True)
        ):
            x, size = embed(x)  # (B, L, C)
            if i == 0:
                scale = size[0] // mask.shape[1]
                w = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
                w = w.reshape(B, -1, 1).to(x.dtype)
                x = x * (1 - w) + self.mask_token * w
            x = drop(x)
            for j, blk in enumerate(blocks):
                x = blk(x, size)
                if j == 0:
                    x = peg(x, size)
            if i < last:
                x = x.reshape(B, *size, -1).permute(0, 3, 1, 2).contiguous()
        pred = self.head(enc.norm(x))  # (B, h*w, s*s*3)
        h = images.shape[-1] // self.stride
        s = self.stride
        rec = pred.view(B, h, h, s, s, 3).permute(0, 5, 1, 3, 2, 4).reshape(images.shape)
        pix = mask.repeat_interleave(self.unit, 1).repeat_interleave(self.unit, 2)[:, None]
        return ((rec - images).abs() * pix).sum() / (pix.sum() * 3)


def token_table(enc, mask) -> None:
    plan = enc.plan(mask)
    B = mask.shape[0]
    print("\nTokens per stage (Green Twins; dense = what the SimMIM baseline runs on)")
    print(
        "| stage | dense | visible | LSA slots executed | GSA keys executed | GSA keys valid | GSA keys dense |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for i, st in enumerate(plan.stages):
        dense, visible = B * st.grid**2, len(st.coords)
        lsa = st.windows.executed_tokens if st.windows is not None else "-"
        sr = enc.cfg.sr_ratios[i]
        if st.reduce is None:
            keys, valid, keys_dense = B * (visible // B), visible, dense
        else:
            keys, valid = st.reduce.pad_index.numel(), len(st.reduce.out_coords)
            keys_dense = B * (st.grid // sr) ** 2
        print(f"| {i + 1} | {dense} | {visible} | {lsa} | {keys} | {valid} | {keys_dense} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="twins_svt_small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.75)
    p.add_argument("--encoders", action="store_true", help="also time the encoders alone")
    args = p.parse_args()

    torch.manual_seed(0)
    green = GreenMIM(gc.create_model(args.model), MIMConfig(mask_ratio=args.ratio))
    simmim = SimMIMTwins(gc.create_model(args.model), unit=green.unit)
    img = green.encoder.img_size
    images = torch.randn(args.batch, 3, img, img)
    mask = green.random_mask(args.batch, generator=torch.Generator().manual_seed(0))

    steps = {
        "SimMIM dense": (simmim, lambda: simmim(images, mask)),
        "GreenMIM": (green, lambda: green(images, mask)[0]),  # plan made inside the step
    }
    if args.encoders:  # the encoders alone (a sum as loss): the decoder's share shows up
        dense_enc, green_enc = simmim.encoder, green.encoder
        steps["encoder dense"] = (dense_enc, lambda: dense_enc.forward_features(images).sum())
        steps["encoder visible"] = (
            green_enc,
            lambda: green_enc.forward_visible(images, mask).sum(),
        )
    saved = {k: saved_bytes(fn, exclude=m) for k, (m, fn) in steps.items()}

    def step(model, fn):
        fn().backward()
        model.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {k: [] for k in steps}
    for m, fn in steps.values():  # warm-up
        step(m, fn)
    for _ in range(args.runs):  # interleaved, so that machine load hits both alike
        for k, (m, fn) in steps.items():
            times[k].append(timed(lambda m=m, fn=fn: step(m, fn), 1))

    flag = " --encoders" if args.encoders else ""
    print(
        f"    python bench/bench_twins.py --model {args.model} --batch {args.batch} "
        f"--runs {args.runs}{flag}"
    )
    print(
        f"\n{args.model}, {img} px, batch {args.batch}, mask ratio {args.ratio} of {green.unit} px units "
        f"(per sample), {torch.get_num_threads()} CPU threads, median of {args.runs} interleaved steps"
    )
    print(
        "| model | step s (median) | speed-up | activations saved for backward MiB | memory ratio |"
    )
    print("|---|---:|---:|---:|---:|")
    for k in steps:
        base = "encoder dense" if k.startswith("encoder") else "SimMIM dense"
        base_t, base_b = statistics.median(times[base]), saved[base]
        t = statistics.median(times[k])
        print(
            f"| {k} | {t:.3f} | {base_t / t:.2f}x | {saved[k] / 2**20:.1f} | {saved[k] / base_b:.3f} |"
        )
    token_table(green.encoder, mask)


if __name__ == "__main__":
    main()
