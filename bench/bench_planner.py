"""Window-grouping planner on Swin-B at 224 px: chosen g vs the original rule, and planner time.

Per stage and window partition (regular, shifted) of one forward step: windows, g (searched /
original rule g = min(ws^2, max occupancy)), groups, token slots executed vs visible tokens,
cost ratio searched / original under the same ``CostModel``, and the planner's median time.

    python bench/bench_planner.py [--batch 128] [--mask-ratio 0.75] [--token 32]
"""

import argparse
import time

import numpy as np

from greenmim_core.grouping import CostModel, optimal_grouping, original_rule_packing

WINDOW = 7
STAGES = [56, 28, 14, 7]  # token grid per stage, 224 px with patch 4
UNITS = 7  # mask units per side: 224 px / 32 px


def random_unit_masks(batch, ratio, rng, shared):
    """(B, U, U) bool mask units, True = masked; int(U*U*(1-ratio)) visible per sample."""
    n = UNITS * UNITS
    noise = rng.random((1 if shared else batch, n))
    mask = np.ones(noise.shape, dtype=bool)
    np.put_along_axis(mask, np.argsort(noise, axis=1)[:, : int(n * (1 - ratio))], False, axis=1)
    return np.broadcast_to(mask.reshape(-1, UNITS, UNITS), (batch, UNITS, UNITS))


def window_occupancy(mask_buu, grid, shift):
    """Visible tokens per window (B * nW,); window index per axis (h + ws - shift) // ws."""
    B = mask_buu.shape[0]
    unit = grid // UNITS
    visible = ~mask_buu.repeat(unit, 1).repeat(unit, 2)
    idx = (np.arange(grid) + (WINDOW - shift) % WINDOW) // WINDOW
    nw = int(idx[-1]) + 1
    wid = (np.arange(B)[:, None, None] * nw + idx[None, :, None]) * nw + idx[None, None, :]
    return np.bincount(wid[visible], minlength=B * nw * nw)


def median_time(fn, runs):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench(mask, cost, runs):
    header = (
        f"{'stage':>5} {'part':>5} {'windows':>7} {'g':>3} {'g0':>3} {'groups':>6} "
        f"{'groups0':>7} {'executed':>8} {'exec0':>8} {'visible':>8} {'cost/c0':>7} "
        f"{'plan ms':>7} {'rule ms':>7}"
    )
    print(header)
    print("-" * len(header))
    total = total0 = 0.0
    for stage, grid in enumerate(STAGES, 1):
        # Swin drops the shift where the window covers the whole grid
        for part, shift in [("W", 0), ("SW", WINDOW // 2 if grid > WINDOW else 0)]:
            counts = window_occupancy(mask, grid, shift)
            best = optimal_grouping(counts, cost=cost)
            original = original_rule_packing(counts, WINDOW * WINDOW, cost)
            t = median_time(lambda c=counts: optimal_grouping(c, cost=cost), runs)
            t0 = median_time(lambda c=counts: original_rule_packing(c, WINDOW**2, cost), runs)
            total, total0 = total + t, total0 + t0
            print(
                f"{stage:>5} {part:>5} {len(counts):>7} {best.group_size:>3} "
                f"{original.group_size:>3} {best.num_groups:>6} {original.num_groups:>7} "
                f"{best.executed_tokens:>8} {original.executed_tokens:>8} {counts.sum():>8} "
                f"{best.cost / original.cost:>7.4f} {t * 1e3:>7.3f} {t0 * 1e3:>7.3f}"
            )
    print(
        f"planner time per step (8 plans): {total * 1e3:.2f} ms (original rule {total0 * 1e3:.2f} ms)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--token", type=float, default=CostModel().token)
    parser.add_argument("--group", type=float, default=CostModel().group)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cost = CostModel(token=args.token, group=args.group)
    print(
        f"Swin-B 224 px, window {WINDOW}, batch {args.batch}, mask ratio {args.mask_ratio}, "
        f"mask unit 32 px, {cost}"
    )
    for shared in (False, True):
        rng = np.random.default_rng(args.seed)
        print(f"\n{'one mask shared by the batch' if shared else 'per-sample masks'}")
        bench(random_unit_masks(args.batch, args.mask_ratio, rng, shared), cost, args.runs)


if __name__ == "__main__":
    main()
