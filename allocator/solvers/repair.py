"""Greedy moves shared by the greedy solver and the rounding solvers (convex, BAQ, DP).

:func:`downgrade` lowers units while the allocation is over budget, always taking the move with the
least loss increase per saved bit (any move that lowers both loss and bits is taken first, budget
or not). :func:`fill` then spends the slack: among the moves to a heavier option that still fit,
it takes the largest loss decrease per added bit, until none is left. Both only ever change one
unit at a time and are vectorized over units, O(U x O) per move. :func:`exchange` then tries pairs:
one unit up and another down (or both changed) when together they fit and lower the loss, which a
one-unit move cannot find once the slack is spent.
"""

from __future__ import annotations

import numpy as np

from allocator.solvers.base import Problem


def downgrade(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """Lower units until the allocation fits the budget (see the module doc)."""
    choice = np.array(choice, dtype=np.int64)
    rows = np.arange(problem.num_units)
    weight = problem.weight.astype(np.float64)
    total = problem.total_bits(choice)
    while True:
        w_now = weight[rows, choice][:, None]
        c_now = problem.cost[rows, choice][:, None]
        lighter = problem.allowed & (weight < w_now)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(lighter, (problem.cost - c_now) / (w_now - weight), np.inf)
        flat = int(np.argmin(ratio))
        best = ratio.flat[flat]
        over = total > problem.budget_bits
        if not np.isfinite(best) or (not over and best >= 0):
            if over:  # cannot happen once build_problem checked the lightest allocation fits
                raise RuntimeError("no downgrade left but still over budget")
            return choice
        unit, option = divmod(flat, problem.weight.shape[1])
        total += int(problem.weight[unit, option] - problem.weight[unit, choice[unit]])
        choice[unit] = option


def fill(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """Spend the remaining budget on the upgrades with the best loss decrease per added bit."""
    choice = np.array(choice, dtype=np.int64)
    rows = np.arange(problem.num_units)
    weight = problem.weight.astype(np.float64)
    total = problem.total_bits(choice)
    while True:
        slack = problem.budget_bits - total
        w_now = weight[rows, choice][:, None]
        c_now = problem.cost[rows, choice][:, None]
        gain = c_now - problem.cost
        added = weight - w_now
        ok = problem.allowed & (added <= slack) & (gain > 0)
        if not ok.any():
            return choice
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(ok, gain / np.maximum(added, 0.5), -np.inf)  # free upgrades score highest
        flat = int(np.argmax(score))
        unit, option = divmod(flat, problem.weight.shape[1])
        total += int(problem.weight[unit, option] - problem.weight[unit, choice[unit]])
        choice[unit] = option


def exchange(problem: Problem, choice: np.ndarray, allowed: np.ndarray | None = None, max_moves: int = 1000) -> np.ndarray:
    """Apply the best improving two-unit change that fits, until there is none (first-improvement
    would be cheaper per move but lands in worse local optima). ``allowed`` restricts the options
    considered (default: the problem's); O(M^2) per move over the M candidate (unit, option) pairs."""
    choice = np.array(choice, dtype=np.int64)
    rows = np.arange(problem.num_units)
    mask = problem.allowed if allowed is None else allowed & problem.allowed
    total = problem.total_bits(choice)
    for _ in range(max_moves):
        candidate = mask.copy()
        candidate[rows, choice] = False
        unit, option = np.nonzero(candidate)
        if len(unit) < 2:
            break
        d_cost = problem.cost[unit, option] - problem.cost[unit, choice[unit]]
        d_bits = problem.weight[unit, option] - problem.weight[unit, choice[unit]]
        gain = d_cost[:, None] + d_cost[None, :]
        fits = (d_bits[:, None] + d_bits[None, :]) <= problem.budget_bits - total
        gain = np.where(fits & (unit[:, None] != unit[None, :]), gain, np.inf)
        best = int(np.argmin(gain))
        if not gain.flat[best] < -1e-12 * max(1.0, abs(problem.total_cost(choice))):
            break
        for k in divmod(best, len(unit)):
            total += int(d_bits[k])
            choice[unit[k]] = option[k]
    return choice


def repair(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """Make ``choice`` fit the budget, then use up the slack."""
    return fill(problem, downgrade(problem, choice))
