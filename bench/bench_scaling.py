"""Training-step scaling: GreenMIM vs the SimMIM-style dense baseline, vs mask ratio and batch.

One training step = forward + backward + AdamW step (fused on CUDA), bf16 autocast on CUDA and
fp32 on CPU (``train.precision: auto``). GreenMIM gets its masks and encoder plans made ahead
(pinned on CUDA), as the data loader delivers them; the baseline (``bench_pretrain_step``'s
``SimMIMSwin``) runs the dense encoder on all tokens with a mask token. Prints two tables
(step time vs mask ratio at one batch, vs batch at one ratio) and saves a PNG plot if
matplotlib is installed.

    python bench/bench_scaling.py [--model swin_tiny_patch4_window7_224] [--device cpu]
        [--batch 4] [--batches 2 4 8] [--ratios 0.5 0.6 0.75 0.9] [--runs 3] [--plot out.png]

``measure_step`` is shared with ``bench/gpu_check.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_pretrain_step import SimMIMSwin, saved_bytes  # noqa: E402

import greenmim_core as gc  # noqa: E402
from greenmim_core.mim import GreenMIM, MIMConfig  # noqa: E402
from greenmim_core.planner import MaskPlanner  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(
    name: str,
    batch: int,
    ratio: float,
    device: torch.device,
    model: str = "greenmim",
    runs: int = 20,
    warmup: int = 3,
    backend: str = "auto",
    compile_blocks: bool = False,
    plans: int = 4,
) -> dict:
    """Median step time of ``model`` ('greenmim' or 'simmim'); memory and token counts.

    Returns step_s (median), step_s_min/max, images_per_s, peak_bytes (CUDA: the step's
    ``max_memory_allocated``; CPU: bytes saved for backward) and for GreenMIM the tokens the
    attention cores execute vs the visible ones, and the time one plan takes to make on one
    CPU thread (what the training thread paid per step before plans came with the batch).
    """
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    mim_cfg = MIMConfig(mask_ratio=ratio)
    enc = gc.create_model(name)
    enc.attention_backend = backend
    if compile_blocks:
        from workers.model import compile_blocks as compile_encoder

        compile_encoder(enc)
    green = GreenMIM(enc, mim_cfg).to(device)
    images = torch.randn(batch, 3, enc.img_size, enc.img_size, device=device)
    planner = MaskPlanner(enc.cfg, mim_cfg)
    made = [planner(batch, torch.Generator().manual_seed(i)) for i in range(plans)]
    if cuda:
        made = [(m.pin_memory(), p.pin_memory()) for m, p in made]
    out: dict = {"model": model, "name": name, "batch": batch, "ratio": ratio}
    if model == "greenmim":
        net: torch.nn.Module = green
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        plan_t = []
        for m, _ in made:
            t0 = time.perf_counter()
            enc.plan(m)
            plan_t.append(time.perf_counter() - t0)
        torch.set_num_threads(threads)
        out["plan_inline_s"] = statistics.median(plan_t)
        p0 = made[0][1]
        out["executed_tokens"], out["visible_tokens"] = p0.executed_tokens, p0.visible_tokens
        out["dense_tokens"] = sum(
            batch * s.grid**2 * len(s.block_plans) for s in p0.stages
        )  # what a dense encoder's attention runs on
        out["backend"] = backend
    else:
        net = SimMIMSwin(gc.create_model(name), unit=green.unit).to(device)
        del green
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if cuda else {}))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    state = {"i": 0, "thread_s": 0.0}

    def loss_fn():
        m, p = made[state["i"] % len(made)]
        state["i"] += 1
        t0 = time.perf_counter()
        m, p = m.to(device, non_blocking=True), p.to(device)
        state["thread_s"] += time.perf_counter() - t0  # plan work left on the training thread
        with autocast:
            if model == "greenmim":
                return net(images, m, p)[0]
            return net(images, m)

    def step():
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    state["thread_s"] = 0.0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    out["plan_on_thread_s"] = state["thread_s"] / runs
    out["step_s"] = statistics.median(times)
    out["step_s_min"], out["step_s_max"] = min(times), max(times)
    out["images_per_s"] = batch / out["step_s"]
    if cuda:
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["memory_kind"] = "cuda max_memory_allocated"
        out["host_syncs"], out["sync_sites"] = count_syncs(step)
    else:
        out["peak_bytes"] = saved_bytes(loss_fn)
        opt.zero_grad(set_to_none=True)
        out["memory_kind"] = "bytes saved for backward"
    return out


def count_syncs(fn) -> tuple[int, list[str]]:
    """Host-device synchronisations CUDA's sync debug mode reports while ``fn`` runs."""
    import warnings

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return len(caught), [str(w.message)[:300] for w in caught[:3]]


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"\n{title}"]
    for i, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def curve(name, device, points, runs, warmup) -> list[dict]:
    """[(batch, ratio)] -> one row per point: both models' step time and their ratio."""
    rows = []
    for batch, ratio in points:
        ours = measure_step(name, batch, ratio, device, "greenmim", runs, warmup)
        base = measure_step(name, batch, ratio, device, "simmim", runs, warmup)
        rows.append(
            {
                "batch": batch,
                "ratio": ratio,
                "greenmim_s": ours["step_s"],
                "simmim_s": base["step_s"],
                "step_ratio": ours["step_s"] / base["step_s"],
                "memory_ratio": ours["peak_bytes"] / base["peak_bytes"],
                "greenmim_range": (ours["step_s_min"], ours["step_s_max"]),
                "simmim_range": (base["step_s_min"], base["step_s_max"]),
            }
        )
    return rows


def curve_table(title: str, rows: list[dict]) -> str:
    header = [
        "batch",
        "mask",
        "GreenMIM s",
        "SimMIM s",
        "step ratio",
        "mem ratio",
        "ranges (min-max)",
    ]
    return table(
        title,
        header,
        [
            [r["batch"], r["ratio"], r["greenmim_s"], r["simmim_s"], r["step_ratio"],
             r["memory_ratio"],
             "{:.3f}-{:.3f} / {:.3f}-{:.3f}".format(*r["greenmim_range"], *r["simmim_range"])]
            for r in rows
        ],
    )  # fmt: skip


def plot(path: str, by_ratio: list[dict], by_batch: list[dict], title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (the tables above hold the same numbers)"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, key, label in ((axes[0], by_ratio, "ratio", "mask ratio"),
                                 (axes[1], by_batch, "batch", "batch")):  # fmt: skip
        xs = [r[key] for r in rows]
        ax.plot(xs, [r["greenmim_s"] for r in rows], "o-", label="GreenMIM")
        ax.plot(xs, [r["simmim_s"] for r in rows], "s--", label="SimMIM dense")
        ax.set_xlabel(label)
        ax.set_ylabel("step time (s)")
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return f"plot written to {path}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="swin_tiny_patch4_window7_224")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=4, help="batch of the mask-ratio curve")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--ratio", type=float, default=0.75, help="mask ratio of the batch curve")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.6, 0.75, 0.9])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--plot", default="bench_scaling.png")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    by_ratio = curve(
        args.model, device, [(args.batch, r) for r in args.ratios], args.runs, args.warmup
    )
    print(
        curve_table(
            f"{args.model} on {device}, batch {args.batch}: step time vs mask ratio", by_ratio
        )
    )
    by_batch = curve(
        args.model, device, [(b, args.ratio) for b in args.batches], args.runs, args.warmup
    )
    print(curve_table(f"{args.model} on {device}, mask {args.ratio}: step time vs batch", by_batch))
    print(plot(args.plot, by_ratio, by_batch, f"{args.model} on {device}"))


if __name__ == "__main__":
    main()
