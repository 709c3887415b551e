"""Window grouping: validity, optimality against brute force, and realistic masks."""

import itertools
from functools import cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from greenmim_core.grouping import (
    CostModel,
    Packing,
    optimal_grouping,
    original_rule_packing,
    pack_windows,
)

pytestmark = pytest.mark.unit

MODELS = [
    CostModel(),
    CostModel(token=0.0),
    CostModel(token=256.0),
    CostModel(token=0.0, group=100.0),
    CostModel(attn=0.0, token=1.0, group=10.0),
]


def check_valid(p: Packing, counts) -> None:
    """Every nonempty window in exactly one group, back to back from slot 0, load <= g."""
    counts = np.asarray(counts, dtype=np.int64)
    empty = counts == 0
    assert (p.window_group[empty] == -1).all() and (p.window_offset[empty] == -1).all()
    group, offset, c = p.window_group[~empty], p.window_offset[~empty], counts[~empty]
    if empty.all():
        assert p.num_groups == 0
        return
    assert ((group >= 0) & (group < p.num_groups)).all()
    loads = np.bincount(group, weights=c, minlength=p.num_groups)
    assert (loads <= p.group_size).all() and (loads > 0).all()
    order = np.lexsort((offset, group))
    group, offset, c = group[order], offset[order], c[order]
    first = np.r_[True, group[1:] != group[:-1]]
    expected = np.where(first, 0, np.r_[0, offset[:-1] + c[:-1]])  # exclusive cumsum per group
    np.testing.assert_array_equal(offset, expected)


def random_unit_masks(batch, units, ratio, rng, shared=False):
    """(B, U, U) bool mask units, True = masked; int(U*U*(1-ratio)) visible per sample."""
    n = units * units
    noise = rng.random((1 if shared else batch, n))
    mask = np.ones(noise.shape, dtype=bool)
    np.put_along_axis(mask, np.argsort(noise, axis=1)[:, : int(n * (1 - ratio))], False, axis=1)
    return np.broadcast_to(mask.reshape(-1, units, units), (batch, units, units))


def window_occupancy(mask_buu, grid, window, shift):
    """Visible tokens per window (B * nW,) of a ``grid``-token stage; window index per axis
    ``(h + window - shift) // window`` (shifted partitions have partial border windows)."""
    B, U, _ = mask_buu.shape
    unit = grid // U
    visible = ~mask_buu.repeat(unit, 1).repeat(unit, 2)
    idx = (np.arange(grid) + (window - shift) % window) // window
    nw = int(idx[-1]) + 1
    wid = (np.arange(B)[:, None, None] * nw + idx[None, :, None]) * nw + idx[None, None, :]
    return np.bincount(wid[visible], minlength=B * nw * nw)


def realistic_counts():
    """Swin (224 px, window 7, mask unit 32 px) occupancies of every stage and partition."""
    rng = np.random.default_rng(0)
    for shared, ratio in itertools.product((False, True), (0.5, 0.75, 0.9)):
        mask = random_unit_masks(8, 7, ratio, rng, shared)
        for grid, shift in [(56, 0), (56, 3), (28, 0), (28, 3), (14, 0), (14, 3), (7, 0)]:
            yield f"{shared=}-{ratio}-{grid}-{shift}", window_occupancy(mask, grid, 7, shift)


REALISTIC = list(realistic_counts())


def martello_toth_bound(counts, g):
    """Martello-Toth L2 lower bound on the number of groups of size g (>= ceil(sum/g))."""
    c = np.asarray(counts)[np.asarray(counts) > 0]
    best = 0
    for k in range(g // 2 + 1):
        big = c[c > g - k]
        mid = c[(c <= g - k) & (2 * c > g)]
        small = c[(2 * c <= g) & (c >= k)]
        spill = small.sum() - (len(mid) * g - mid.sum())
        best = max(best, len(big) + len(mid) + max(0, -(-spill // g)))
    return best


@cache
def partition_labels(n: int) -> np.ndarray:
    """(Bell(n), n) block label of each item, for every set partition of n items."""
    out = []

    def grow(labels, blocks):
        if len(labels) == n:
            out.append(labels)
            return
        for b in range(blocks + 1):
            grow(labels + [b], max(blocks, b + 1))

    grow([], 0)
    return np.array(out, dtype=np.int64).reshape(-1, n)


def brute_force(items, max_group, cost):
    """Minimum cost over all partitions of ``items`` with largest group load <= max_group."""
    labels = partition_labels(len(items))
    loads = (labels[:, :, None] == np.arange(len(items))).astype(np.int64)
    loads = np.einsum("pib,i->pb", loads, np.asarray(items))
    g, n = loads.max(1), labels.max(1) + 1
    ok = g <= max_group
    return min(cost(int(gi), int(ni)) for gi, ni in zip(g[ok], n[ok], strict=True))


def test_window_occupancy_matches_shapes_and_totals():
    mask = random_unit_masks(2, 7, 0.75, np.random.default_rng(1))
    regular, shifted = window_occupancy(mask, 56, 7, 0), window_occupancy(mask, 56, 7, 3)
    assert len(regular) == 2 * 64 and len(shifted) == 2 * 81
    assert regular.sum() == shifted.sum() == 2 * 12 * 64  # 12 visible units of 8x8 tokens
    assert regular.max() <= 49 and shifted.max() <= 49


@pytest.mark.parametrize("name,counts", REALISTIC, ids=[n for n, _ in REALISTIC])
def test_realistic_never_worse_than_original_rule(name, counts):
    for cost in MODELS:
        best, original = (
            optimal_grouping(counts, cost=cost),
            original_rule_packing(counts, 49, cost),
        )
        check_valid(best, counts)
        check_valid(original, counts)
        assert best.cost <= original.cost
        assert best.cost == cost(best.group_size, best.num_groups)
    default = optimal_grouping(counts)
    lower = martello_toth_bound(counts, default.group_size)
    assert lower >= -(-counts.sum() // default.group_size)
    # seen: at most 3.6 % above the bound (shared masks repeat one sample's windows B times)
    assert lower <= default.num_groups <= 1.04 * lower + 1, (default.num_groups, lower)


def test_random_vectors_optimal_over_every_group_size():
    rng = np.random.default_rng(2)
    for trial in range(60):
        w, top = rng.integers(1, 300), rng.integers(1, 60)
        counts = rng.integers(0, top + 1, w) * (rng.random(w) < 0.8)
        cost = MODELS[trial % len(MODELS)]
        largest = int(counts.max())
        hi = largest + int(rng.integers(0, 40))
        best = optimal_grouping(counts, max_group=hi, cost=cost)
        check_valid(best, counts)
        # the pruned search equals the exhaustive one, ties to the smaller g
        exhaustive = [pack_windows(counts, g, cost) for g in range(largest, hi + 1)]
        costs = [p.cost for p in exhaustive]
        assert best.cost == min(costs)
        assert best.group_size == largest + int(np.argmin(costs))
        if largest:
            assert best.cost <= original_rule_packing(counts, max(largest, 49), cost).cost


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 49), max_size=60), st.integers(0, 60))
def test_pack_windows_is_valid_and_within_twice_the_bound(counts, extra):
    counts = np.array(counts, dtype=np.int64)
    g = int(counts.max(initial=0)) + extra
    p = pack_windows(counts, g)
    check_valid(p, counts)
    total = int(counts.sum())
    # two consecutive groups hold more than g, or the second would fit into the first
    assert p.num_groups <= (2 * total // g + 1 if g else 0)
    assert p.num_groups >= (-(-total // g) if g else 0)
    best = optimal_grouping(counts)
    check_valid(best, counts)
    if total:
        assert best.cost <= original_rule_packing(counts, 49).cost


@pytest.mark.parametrize(
    "counts,g,groups",
    [
        ([7] * 30, 49, 5),  # 7 divides 49: seven windows per group
        ([7] * 29, 49, 5),
        ([30, 19] * 40, 49, 40),  # pairs fill groups exactly
        ([25, 24, 13, 36, 49] * 9, 49, 27),
        ([1, 2, 4, 8, 16] * 13, 32, 13),  # divisible sizes fill every group
        ([49] * 11, 49, 11),
    ],
)
def test_group_count_meets_tight_bound(counts, g, groups):
    p = pack_windows(np.array(counts), g)
    check_valid(p, counts)
    assert p.num_groups == groups == -(-sum(counts) // g)


def test_first_group_is_an_optimal_knapsack():
    rng = np.random.default_rng(3)
    for _ in range(200):
        counts = rng.integers(1, 30, rng.integers(1, 13))
        g = int(counts.max()) + int(rng.integers(0, 40))
        subsets = np.array(list(itertools.product((0, 1), repeat=len(counts))))
        sums = subsets @ counts
        p = pack_windows(counts, g)
        assert counts[p.window_group == 0].sum() == sums[sums <= g].max()


def test_matches_brute_force_on_small_instances():
    rng = np.random.default_rng(4)
    worst = {}
    for _ in range(250):
        counts = rng.integers(0, 20, rng.integers(1, 9))
        if not counts.any():
            continue
        items = [int(c) for c in counts if c]
        hi = 2 * max(items)
        for cost in MODELS[:4]:
            planned = optimal_grouping(counts, max_group=hi, cost=cost)
            exact = brute_force(items, hi, cost)
            assert planned.cost >= exact  # below the true optimum would be a bug
            worst[cost] = max(worst.get(cost, 1.0), planned.cost / exact)
    # repeated knapsack is a heuristic for bin packing; on these seeds it stays within 10 %
    assert worst[CostModel()] == 1.0
    assert max(worst.values()) <= 1.1, worst


def test_exact_on_divisible_sizes():
    """Sizes dividing each other and g: greedy filling hits g exactly, so n = ceil(sum/g)."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        counts = 2 ** rng.integers(0, 4, rng.integers(1, 9))
        for cost in MODELS[:4]:
            g = int(counts.max())
            planned = optimal_grouping(counts, max_group=g, cost=cost)
            assert planned.num_groups == -(-counts.sum() // g)
            assert planned.cost == brute_force(counts.tolist(), g, cost)


def test_group_search_beats_the_original_rule():
    counts = np.array([26] * 20 + [49])  # g = 49 fits one 26 per group; g = 52 fits two
    best, original = (
        optimal_grouping(counts, cost=CostModel(token=0)),
        original_rule_packing(counts, 49, CostModel(token=0)),
    )
    assert (original.group_size, original.num_groups) == (49, 21)
    assert (best.group_size, best.num_groups) == (52, 11)
    assert best.cost < original.cost


def test_ties_prefer_the_smaller_group():
    padded_tokens = CostModel(attn=0.0, token=1.0)  # cost = g * n
    p = optimal_grouping([2, 2], cost=padded_tokens)
    assert (p.group_size, p.num_groups) == (2, 2)
    p = optimal_grouping([3, 5, 4], cost=CostModel(attn=0, token=0, group=0))
    assert p.group_size == 5 and p.cost == 0


@pytest.mark.parametrize("counts", [[], [0, 0, 0], np.zeros(5, dtype=np.uint8)])
def test_empty_windows(counts):
    for p in (optimal_grouping(counts), pack_windows(counts, 0), original_rule_packing(counts, 49)):
        assert (p.group_size, p.num_groups, p.cost) == (0, 0, 0.0)
        assert (p.window_group == -1).all() and len(p.window_group) == len(counts)


def test_empty_windows_get_no_group():
    p = optimal_grouping([0, 3, 0, 5])
    np.testing.assert_array_equal(p.window_group, [-1, 0, -1, 0])
    np.testing.assert_array_equal(p.window_offset, [-1, 5, -1, 0])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: pack_windows([3, -2, 1], 4), "-2"),
        (lambda: optimal_grouping([1.5, 2]), "float64"),
        (lambda: optimal_grouping([[1, 2]]), r"\(1, 2\)"),
        (lambda: pack_windows([3, 9, 1], 8), "group_size=8"),
        (lambda: pack_windows([3, 1], 4.0), "4.0"),
        (lambda: optimal_grouping([3, 9], max_group=5), "max_group=5"),
        (lambda: original_rule_packing([50], 49), "window_area=49"),
        (lambda: CostModel(token=-1.0), "-1.0"),
    ],
)
def test_errors_name_the_bad_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()
