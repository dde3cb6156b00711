"""BAQ-style closed form (2025): fit ``loss_u(b) ~ a_u 2^(-2b)`` per unit, allocate continuous bits
by reverse water-filling, round to the available options and repair.

With n_u weights at b_u bits per weight the relaxed problem is::

    minimize sum_u a_u 2^(-2 b_u)   s.t.  sum_u n_u b_u <= B,  lo_u <= b_u <= hi_u

Its KKT condition ``2 ln2 a_u 2^(-2 b_u) = lambda n_u`` equalizes the marginal loss per bit of every
unit not at a bound ("equal loss" per weight), giving ``b_u(lambda) = clip(0.5 log2(2 ln2 a_u /
(lambda n_u)), lo_u, hi_u)``; ``sum n_u b_u(lambda)`` falls monotonically in lambda, so lambda is found by
bisection on log2(lambda). ``a_u`` is the least-squares fit in log space with the slope fixed at
-2: ``log2 a_u = mean_o(log2 loss[u, o] + 2 bpw[u, o])`` over the unit's options with positive loss
(a unit with no positive loss gets its lightest option). Every unit then takes the widest option not above its b_u
(so the budget holds), and :func:`~allocator.solvers.repair.repair` spends the slack by the
table's losses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from allocator.solvers.base import Budget, Constraints, Problem, run_solver
from allocator.solvers.repair import repair
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable

NAME = "baq"
_BISECTION_STEPS = 100


def fit_scale(problem: Problem) -> tuple[np.ndarray, float]:
    """Per-unit ``log2 a_u`` (-inf where no positive loss) and the RMS residual of the fit in log2."""
    bpw = problem.weight / problem.numel[:, None]
    usable = problem.allowed & (problem.cost > 0) & np.isfinite(problem.cost)
    with np.errstate(divide="ignore", invalid="ignore"):
        points = np.where(usable, np.log2(np.where(usable, problem.cost, 1.0)) + 2 * bpw, np.nan)
    counts = usable.sum(axis=1)
    log_a = np.full(problem.num_units, -np.inf)
    has = counts > 0
    log_a[has] = np.nanmean(points[has], axis=1)
    residual = (points - log_a[:, None])[usable]
    rms = float(np.sqrt(np.mean(residual**2))) if residual.size else 0.0
    return log_a, rms


def water_fill(log_a: np.ndarray, numel: np.ndarray, low: np.ndarray, high: np.ndarray, budget_bits: int) -> tuple[np.ndarray, float]:
    """Continuous bits per weight of every unit and log2(lambda) (-inf when the budget is slack)."""
    offset = math.log2(2 * math.log(2)) + log_a - np.log2(numel)  # b_u = 0.5 (offset_u - t)

    def bits_at(t: float) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.clip(0.5 * (offset - t), low, high)

    if float(numel @ high) <= budget_bits:
        return high.astype(np.float64), -math.inf
    finite = np.isfinite(offset)
    if not finite.any():  # no unit has a positive loss: nothing to gain from bits
        return low.astype(np.float64), math.inf
    t_low = float(np.min(offset[finite] - 2 * high[finite]))  # every unit at its top
    t_high = float(np.max(offset[finite] - 2 * low[finite]))  # every unit at its bottom
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (t_low + t_high)
        if float(numel @ bits_at(mid)) > budget_bits:
            t_low = mid
        else:
            t_high = mid
    return bits_at(t_high), t_high


def choose(problem: Problem) -> tuple[np.ndarray, dict[str, Any]]:
    bpw = problem.weight / problem.numel[:, None]
    low = np.where(problem.allowed, bpw, np.inf).min(axis=1)
    high = np.where(problem.allowed, bpw, -np.inf).max(axis=1)
    log_a, rms = fit_scale(problem)
    target, log_lambda = water_fill(log_a, problem.numel, low, high, problem.budget_bits)
    # Round down: the widest option not above the continuous target (targets never fall below a
    # unit's lightest option). Rounding to the nearest option instead overshoots, and the repair
    # that follows then lowers units by the table's losses, not the fitted ones: on 200 x 5
    # synthetic tables that ends ~3% above the optimum on average, rounding down + fill ~0.2%.
    below = problem.allowed & (bpw <= target[:, None] * (1 + 1e-12))
    rounded = np.argmax(np.where(below, bpw, -np.inf), axis=1)
    choice = repair(problem, rounded)
    continuous = float(np.sum(np.exp2(log_a - 2 * target)[np.isfinite(log_a)]))
    info = {
        "log2_lambda": log_lambda if math.isfinite(log_lambda) else None,  # None: budget not binding / no loss
        "fit_rms_log2": rms,
        "continuous_loss": continuous,
        "changed_by_repair": int((choice != rounded).sum()),
    }
    return choice, info


def solve(table: SensitivityTable, budget: Budget, constraints: Constraints = Constraints()) -> BitMap:
    """Closed-form reverse water-filling on a fitted a 2^(-2b) model, then rounding and repair."""
    return run_solver(NAME, choose, table, budget, constraints, {})
