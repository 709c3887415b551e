"""Optimal grouping of attention windows (GreenMIM, Huang et al. 2022, arXiv 2205.13515).

After masking, window ``w`` of a Swin stage holds ``counts[w]`` visible tokens, its occupancy
(0..ws^2). Group window attention packs the windows into groups of ``g`` token slots, windows
laid out back to back and the rest padding, and runs one masked attention per group.

* ``pack_windows(counts, g)`` is the paper's repeated 0/1 knapsack: fill one group with the
  subset of the remaining windows of largest total occupancy <= g, remove it, repeat.
* ``optimal_grouping(counts)`` also chooses ``g``: the packing of least ``CostModel`` cost.
  The original code fixed g = min(ws^2, max occupancy), kept as ``original_rule_packing``.

Occupancies take at most ws^2 + 1 distinct values, so the planner works on their histogram,
not on windows: the knapsack runs over distinct values with multiplicities, on Python-int
bitsets (bit ``s`` set = load ``s`` reachable), and each group composition it finds is repeated
as often as the remaining windows allow before it is solved again. Run time then barely depends
on the number of windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Cost of one attention call over n groups of size g: ``n * (attn*g*g + token*g + group)``.

    Only ratios matter. Per group and head, the attention core moves ~g^2 values (relative
    position bias, mask, scores) and, per token slot, the gathered q, k, v and the scattered
    output: 4*d values for head dim d. Window attention at these sizes is memory bound, so
    ``token / attn`` ~ d = 32, Swin's head dim at every stage and size. This assumes the qkv and
    output projections run on the unpadded tokens; run on the padded groups, as in the original
    code, they would add 4*C^2 multiply-adds per slot against 2*C*g^2 per group: token ~ 2*C.
    """

    attn: float = 1.0  # score matrix + softmax + AV ~ g^2 per group
    token: float = 32.0  # gather q/k/v + scatter output per padded slot, relative to attn
    group: float = 0.0  # fixed overhead per group

    def __post_init__(self):
        for name in ("attn", "token", "group"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"CostModel.{name} must be >= 0, got {value!r}")

    def __call__(self, group_size: int, num_groups: int) -> float:
        g = group_size
        return num_groups * (self.attn * g * g + self.token * g + self.group)


@dataclass(frozen=True, eq=False)
class Packing:
    """Windows packed into ``num_groups`` groups of ``group_size`` slots.

    window_group:  (W,) int64, group of each window; -1 for empty windows.
    window_offset: (W,) int64, slot of the window's first token in its group; -1 for empty
                   windows. The windows of a group lie back to back from slot 0.
    cost:          ``CostModel`` cost of the attention call.
    """

    group_size: int
    num_groups: int
    window_group: np.ndarray
    window_offset: np.ndarray
    cost: float

    @property
    def executed_tokens(self) -> int:
        """Token slots the attention runs on, padding included."""
        return self.group_size * self.num_groups


def pack_windows(counts, group_size: int, cost: CostModel = CostModel()) -> Packing:
    """Pack windows of occupancy ``counts`` (W,) into groups of ``group_size`` by repeated knapsack.

    Each group takes the sub-multiset of the remaining occupancies with the largest sum <= g
    (ties: larger windows first). Raises ValueError if ``group_size < max(counts)``.
    """
    counts = _as_counts(counts)
    hist = np.bincount(counts, minlength=1)
    g = _check_size("group_size", group_size, len(hist) - 1)
    return _layout(counts, hist, g, _knapsack_rounds(hist, g), cost)


def optimal_grouping(
    counts, max_group: int | None = None, cost: CostModel = CostModel()
) -> Packing:
    """The least-cost ``pack_windows(counts, g)`` over g in [max(counts), max_group].

    ``max_group`` defaults to ``sum(counts)``: one group then holds every window, and a larger
    g only adds cost. Every g in range is covered, most by a lower bound instead of a packing:
    n(g) >= max(ceil(sum/g), #windows > g/2). Ties go to the smaller g, so g = max(counts), the
    original rule, is beaten only by a strictly cheaper packing.
    """
    counts = _as_counts(counts)
    hist = np.bincount(counts, minlength=1)
    g0, total = len(hist) - 1, int(counts.sum())
    hi = total if max_group is None else min(_check_size("max_group", max_group, g0), total)
    best_g, best_rounds = g0, _knapsack_rounds(hist, g0)
    best = cost(g0, sum(reps for _, reps in best_rounds))
    if cost.attn > 0 and total > 0:  # cost(g) >= total * (attn*g + token)
        hi = min(hi, int((best / total - cost.token) / cost.attn) + 1)

    g = np.arange(g0 + 1, hi + 1)
    cum = np.cumsum(hist)
    n_big = cum[-1] - cum[np.minimum(g // 2, g0)]  # windows that cannot share a group
    n_low = np.maximum(-(-total // g), n_big)
    low = n_low * (cost.attn * g * g + cost.token * g + cost.group)
    for i in np.lexsort((g, low)):
        if low[i] > best:
            break
        gi = int(g[i])
        if low[i] == best and gi > best_g:
            continue
        rounds = _knapsack_rounds(hist, gi)
        c = cost(gi, sum(reps for _, reps in rounds))
        if c < best or (c == best and gi < best_g):
            best, best_g, best_rounds = c, gi, rounds
    return _layout(counts, hist, best_g, best_rounds, cost)


def original_rule_packing(counts, window_area: int, cost: CostModel = CostModel()) -> Packing:
    """The original code's plan: g = min(window_area, max(counts)), packed by ``pack_windows``."""
    counts = _as_counts(counts)
    if isinstance(window_area, bool) or not isinstance(window_area, int | np.integer):
        raise ValueError(f"window_area must be an int, got {window_area!r}")
    largest = int(counts.max(initial=0))
    if window_area < 1 or window_area < largest:
        raise ValueError(f"window_area={window_area} must be >= 1 and >= max(counts)={largest}")
    return pack_windows(counts, min(int(window_area), largest), cost)


def _as_counts(counts) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {counts.shape}")
    if counts.size == 0:
        return counts.astype(np.int64)
    if counts.dtype.kind not in "iu":
        raise ValueError(f"counts must be integers, got dtype {counts.dtype}")
    if counts.min() < 0:
        w = int(counts.argmin())
        raise ValueError(f"counts must be >= 0, got {counts[w]} at window {w}")
    return counts.astype(np.int64, copy=False)


def _check_size(name: str, value, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < lowest:
        raise ValueError(f"{name}={value} is smaller than the largest occupancy {lowest}")
    return int(value)


def _knapsack_rounds(hist: np.ndarray, g: int) -> list[tuple[list[tuple[int, int]], int]]:
    """Repeated knapsack on the occupancy histogram ``hist`` (V+1,), zeros ignored.

    Returns rounds ``(composition, reps)``: ``reps`` groups each holding ``k`` windows of
    occupancy ``v`` for every ``(v, k)`` of the composition (``v`` descending).
    """
    mult = hist.tolist()
    values = [v for v in range(len(mult) - 1, 0, -1) if mult[v]]  # descending
    full = (1 << (g + 1)) - 1
    rounds = []
    while values:
        # 0/1 knapsack over values with multiplicities, split in binary chunks 1, 2, 4, ...
        reach, chunks = 1, []
        for v in values:
            left, k = min(mult[v], g // v), 1
            while left:
                k = min(k, left)
                chunks.append((v, k, reach))
                reach = (reach | reach << (v * k)) & full
                left -= k
                k *= 2
            if reach >> g:  # the group is full: the smaller values are not needed
                break
        # walk back from the best load; skipping late (small) chunks when possible
        load, take = reach.bit_length() - 1, {}
        for v, k, before in reversed(chunks):
            if not before >> load & 1:
                load -= v * k
                take[v] = take.get(v, 0) + k
        composition = sorted(take.items(), reverse=True)
        reps = min(mult[v] // k for v, k in composition)
        for v, k in composition:
            mult[v] -= reps * k
        rounds.append((composition, reps))
        values = [v for v in values if mult[v]]
    return rounds


def _layout(counts, hist, g: int, rounds, cost: CostModel) -> Packing:
    """Hand windows out to the groups of ``rounds``, each value's windows in index order."""
    order = np.argsort(counts, kind="stable")  # windows by occupancy, then index
    next_window = (np.cumsum(hist) - hist).tolist()  # position in ``order`` per value
    seg = []  # (length, first in order, first group, copies, value, offset in group)
    num_groups = 0
    for composition, reps in rounds:
        offset = 0
        for v, k in composition:
            seg.append((reps * k, next_window[v], num_groups, k, v, offset))
            next_window[v] += reps * k
            offset += k * v
        num_groups += reps
    window_group = np.full(len(counts), -1, dtype=np.int64)
    window_offset = np.full(len(counts), -1, dtype=np.int64)
    if seg:
        length, start, group0, copies, value, offset0 = np.array(seg, dtype=np.int64).T
        s = np.repeat(np.arange(len(seg)), length)
        j = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
        windows = order[start[s] + j]
        window_group[windows] = group0[s] + j // copies[s]
        window_offset[windows] = offset0[s] + j % copies[s] * value[s]
    window_group.flags.writeable = False
    window_offset.flags.writeable = False
    return Packing(g, num_groups, window_group, window_offset, cost(g, num_groups))
