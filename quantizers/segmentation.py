"""Optimal and greedy segmentation of a sorted sequence (the grouping step of dynamic grouping).

Given magnitudes sorted ascending, ``v_1 <= ... <= v_n``, split them into contiguous segments
``S_1, ..., S_G`` minimizing (Zheng et al. 2025, arXiv 2509.03054)

    J = sum_k ( |S_k| * Var(S_k) + lambda / |S_k| ),        G <= max_groups.

``|S| * Var(S) = sum_{i in S} (v_i - mean(S))^2`` is exactly the squared error of binarizing the
segment's weights with the scale ``alpha = mean(S)`` of their magnitudes; ``lambda / |S|`` discourages
tiny segments. Every segment cost comes from prefix sums of ``v`` and ``v^2`` in O(1).

Three solvers, all deterministic and returning the segment boundaries ``[0, b_1, ..., n]``:

* :func:`segment_dp` -- the exact dynamic program ``D_g(j) = min_i D_{g-1}(i) + c(i, j)``,
  O(max_groups * n^2) time and O(n^2) memory (n up to a few thousand);
* :func:`segment_greedy` -- bottom-up merging: start from segments of ``window`` consecutive values
  (``window=1``: singletons, the paper's greedy; ``window>1``: its windowed greedy), repeatedly merge
  the adjacent pair whose merge raises ``J`` least, while there are more than ``max_groups``
  segments or a merge still lowers ``J``. O(m log m) for m initial segments.

The reference code ranks candidate merges by the cost of the merged segment; ranking by the change
of ``J`` (what is implemented here) is the greedy step on the stated objective.
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_DP_LENGTH = 4096
"""The exact DP holds an n x n cost table; longer inputs must use the greedy solvers."""


class _Costs:
    """O(1) segment costs ``c(i, j) = sum_{i<=t<j} (v_t - mean)^2 + lambda / (j - i)`` from prefix sums."""

    def __init__(self, values: np.ndarray, lam: float) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.s1 = np.concatenate([[0.0], np.cumsum(v)])
        self.s2 = np.concatenate([[0.0], np.cumsum(v * v)])
        self.lam = lam

    def __call__(self, i: int, j: int) -> float:
        m = j - i
        s = self.s1[j] - self.s1[i]
        return max(self.s2[j] - self.s2[i] - s * s / m, 0.0) + self.lam / m

    def table(self) -> np.ndarray:
        """(n+1) x (n+1) array of ``c(i, j)``, +inf where ``j <= i``."""
        n = len(self.s1) - 1
        i = np.arange(n + 1)[:, None]
        j = np.arange(n + 1)[None, :]
        m = j - i
        valid = m > 0
        safe_m = np.where(valid, m, 1)
        s = self.s1[None, :] - self.s1[:, None]
        sq = self.s2[None, :] - self.s2[:, None]
        cost = np.maximum(sq - s * s / safe_m, 0.0) + self.lam / safe_m
        return np.where(valid, cost, np.inf)


def segment_dp(values: np.ndarray, max_groups: int, lam: float) -> list[int]:
    """Exact minimizer of ``J`` over all segmentations with at most ``max_groups`` segments.

    Among equally good segmentations the one with the fewest segments wins.
    """
    n = len(values)
    _check(n, max_groups)
    if n > MAX_DP_LENGTH:
        raise ValueError(f"exact DP limited to {MAX_DP_LENGTH} values, got {n}; use the greedy solvers")
    cost = _Costs(values, lam).table()
    groups = min(max_groups, n)
    best = cost[0].copy()  # D_1(j) = c(0, j)
    parents = [np.zeros(n + 1, dtype=np.int64)]
    totals = [best[n]]
    for _ in range(2, groups + 1):
        candidates = best[:, None] + cost  # [i, j] = D_{g-1}(i) + c(i, j)
        parent = np.argmin(candidates, axis=0)
        best = candidates[parent, np.arange(n + 1)]
        parents.append(parent)
        totals.append(best[n])
    g = int(np.argmin(totals))  # first minimum: fewest segments
    bounds = [n]
    for level in range(g, 0, -1):
        bounds.append(int(parents[level][bounds[-1]]))
    bounds.append(0)
    return bounds[::-1]


def segment_greedy(values: np.ndarray, max_groups: int, lam: float, window: int = 1) -> list[int]:
    """Greedy adjacent merging from segments of ``window`` values (the last one may be shorter)."""
    n = len(values)
    _check(n, max_groups)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    cost = _Costs(values, lam)
    starts = list(range(0, n, window))
    # Segments are keyed by their start; a merge keeps the left start.
    end = {s: min(s + window, n) for s in starts}
    prev = {s: (starts[k - 1] if k else -1) for k, s in enumerate(starts)}
    seg_cost = {s: cost(s, end[s]) for s in starts}
    heap: list[tuple[float, int, int, int]] = []

    def push(left: int) -> None:
        right = end[left]
        if right < n:
            delta = cost(left, end[right]) - seg_cost[left] - seg_cost[right]
            heapq.heappush(heap, (delta, left, right, end[right]))

    for s in starts:
        push(s)
    count = len(starts)
    while heap:
        delta, left, right, right_end = heap[0]
        if left not in end or end[left] != right or right not in end or end[right] != right_end:
            heapq.heappop(heap)  # stale: one side has merged since this entry was pushed
            continue
        if count <= max_groups and delta >= 0:
            break
        heapq.heappop(heap)
        end[left] = right_end
        seg_cost[left] = cost(left, right_end)
        del end[right], seg_cost[right]
        if right_end < n:
            prev[right_end] = left
        del prev[right]
        count -= 1
        if prev[left] >= 0:
            push(prev[left])
        push(left)
    return sorted(end) + [n]


def segmentation_objective(values: np.ndarray, bounds: list[int], lam: float) -> float:
    """``J`` of a segmentation (for tests and diagnostics)."""
    cost = _Costs(values, lam)
    return float(sum(cost(a, b) for a, b in zip(bounds[:-1], bounds[1:])))


def _check(n: int, max_groups: int) -> None:
    if n < 1:
        raise ValueError("cannot segment an empty sequence")
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
