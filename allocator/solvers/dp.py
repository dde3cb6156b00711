"""Exact dynamic programming over a discretized budget.

State: budget units used so far (0..K). Each unit's option costs ``ceil(bits / step)`` budget
units, and ``K = floor(B / step)``; ``dp[k]`` is the least loss of the units processed so far using
at most k budget units. O(U x O x K) time, U x (K+1) bytes for backtracking.

The step is the greatest common divisor of all option bits when that keeps ``K <= max_states``
(then the discretization loses nothing and the result is the exact optimum), otherwise
``ceil(B / max_states)`` bits. A coarse step rounds every option's bits up, so the result always
fits the exact budget but may leave up to ``U x step`` bits unused; that slack is then spent by the
greedy :func:`~allocator.solvers.repair.fill` (``info["exact"]`` says which case applied).
"""

from __future__ import annotations

import math
from functools import reduce
from typing import Any

import numpy as np

from allocator.solvers.base import Budget, Constraints, Problem, run_solver
from allocator.solvers.repair import fill, repair
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable

NAME = "dp"
DEFAULT_MAX_STATES = 1 << 16


def step_bits(problem: Problem, max_states: int) -> tuple[int, bool]:
    """(step in bits, exact?) for a budget of ``problem.budget_bits``."""
    weights = [int(w) for w in np.unique(problem.weight[problem.allowed]) if w > 0]
    gcd = reduce(math.gcd, weights, 0) or 1
    if problem.budget_bits // gcd <= max_states:
        return gcd, True
    return max(math.ceil(problem.budget_bits / max_states), 1), False


def choose(problem: Problem, max_states: int = DEFAULT_MAX_STATES) -> tuple[np.ndarray, dict[str, Any]]:
    step, exact = step_bits(problem, max_states)
    capacity = problem.budget_bits // step
    units = -(-problem.weight // step)  # ceil
    num_options = problem.weight.shape[1]
    back = np.zeros((problem.num_units, capacity + 1), dtype=np.uint8 if num_options < 256 else np.int32)
    dp = np.zeros(capacity + 1)
    for u in range(problem.num_units):
        new = np.full(capacity + 1, np.inf)
        for o in np.flatnonzero(problem.allowed[u]):
            w = int(units[u, o])
            if w > capacity:
                continue
            candidate = dp[: capacity + 1 - w] + problem.cost[u, o]
            better = candidate < new[w:]
            new[w:][better] = candidate[better]
            back[u, w:][better] = o
        dp = new
    info: dict[str, Any] = {"step_bits": step, "states": capacity + 1, "exact": exact}
    if not np.isfinite(dp[capacity]):
        # Rounding every option up made even the lightest allocation look too big.
        info["fallback"] = "discretization too coarse; greedy repair from the lightest allocation"
        return repair(problem, problem.lightest()), info
    choice = np.empty(problem.num_units, dtype=np.int64)
    k = capacity
    for u in range(problem.num_units - 1, -1, -1):
        choice[u] = back[u, k]
        k -= int(units[u, choice[u]])
    if not exact:
        choice = fill(problem, choice)
    return choice, info


def solve(
    table: SensitivityTable,
    budget: Budget,
    constraints: Constraints = Constraints(),
    max_states: int = DEFAULT_MAX_STATES,
) -> BitMap:
    """Dynamic programming over at most ``max_states`` budget states (exact when bits allow)."""
    return run_solver(NAME, choose, table, budget, constraints, {"max_states": max_states})
