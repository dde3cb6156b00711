"""Exact integer program solved by HiGHS through :func:`scipy.optimize.milp`.

One binary x[u, o] per allowed (unit, option); ``sum_o x[u, o] = 1`` per unit; one knapsack row
``sum w[u, o] x[u, o] <= B``. Ties are already substituted (see :mod:`allocator.solvers.base`).
For numerics the knapsack row is written in bits per weight (bits / total weight count) and the
costs are normalized per unit (same argmin).

Before the MIP, variables are removed by Lagrangian reduced-cost fixing, which keeps the result
exact: for any multiplier lambda >= 0, ``LB = sum_u min_o (c[u,o] + lambda w[u,o]) - lambda B`` is a
lower bound and every feasible x costs at least ``LB + sum of the reduced costs
c + lambda w - min_o(...)`` of its chosen pairs. lambda maximizes LB (bisection on the
subgradient). The incumbent is the Lagrangian argmin that fits (the LP optimum rounded down) after
a greedy fill; with its cost as upper bound UB, a pair whose reduced cost exceeds ``UB - LB`` is in
no solution better than the incumbent and is dropped, and UB is passed to HiGHS as objective cutoff
with its primal heuristics off. HiGHS reaches the same fixings itself, but only after restarts: on
200 x 5 synthetic tables (about 115 tie groups) this leaves ~30% of the variables and roughly
halves the time (see benchmarks/solver_timing.py for current numbers).

HiGHS' feasibility tolerance can admit a few bits over the exact integer budget; the exact total
is checked and the row tightened by the overshoot and solved again (a last-resort greedy repair
keeps the result feasible).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array, vstack

from allocator.bitmap import BitMap
from allocator.errors import BitallocError
from allocator.sensitivity import SensitivityTable
from allocator.solvers.base import Budget, Constraints, Problem, run_solver
from allocator.solvers.repair import downgrade, fill, repair

NAME = "ilp"
_RETRIES = 3
_BISECTION_STEPS = 60


def model_arrays(problem: Problem, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, csr_array]:
    """Variables of the MCKP over the allowed (or ``keep``) pairs: their unit and option, normalized
    costs, knapsack row in bpw, and the sparse one-option-per-unit matrix (U x n)."""
    options = problem.weight.shape[1]
    flat = np.flatnonzero((problem.allowed if keep is None else keep).ravel())
    unit, option = np.divmod(flat, options)
    cost = problem.normalized_cost().ravel()[flat]
    row = problem.weight.ravel()[flat] / problem.total_numel
    assign = csr_array((np.ones(len(flat)), (unit, np.arange(len(flat)))), shape=(problem.num_units, len(flat)))
    return unit, option, cost, row, assign


def decode(problem: Problem, unit: np.ndarray, option: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Unit choice from a 0/1 (or fractional) solution vector: the largest x of each unit."""
    order = np.lexsort((x, unit))  # by unit, then by x; the last entry of each unit is its largest
    last = np.r_[unit[order][1:] != unit[order][:-1], True]
    choice = np.full(problem.num_units, -1, dtype=np.int64)
    choice[unit[order][last]] = option[order][last]
    if (choice < 0).any():
        raise RuntimeError("a unit has no variable in the solution")
    return choice


@dataclass
class Lagrangian:
    """The best multiplier of the knapsack row found by bisection, and what it implies."""

    bound: float
    """Lower bound on the normalized objective of every feasible allocation."""
    reduced: np.ndarray
    """U x O reduced costs ``c + lambda w - min_o(c + lambda w)`` (+inf where not allowed)."""
    feasible_choice: np.ndarray
    """Per unit the argmin at the smallest multiplier found whose argmin fits the budget."""


def lagrangian(problem: Problem) -> Lagrangian:
    """Maximize ``LB(lambda) = sum_u min_o (c + lambda w) - lambda B`` over lambda >= 0 (normalized
    costs, w and B in bpw) by bisection on the subgradient ``sum w(argmin) - B``."""
    cost = problem.normalized_cost()
    row = problem.weight / problem.total_numel
    rhs = problem.budget_bits / problem.total_numel
    rows = np.arange(problem.num_units)

    def at(lam: float) -> tuple[float, float, np.ndarray, np.ndarray]:
        value = cost + lam * row
        best = np.argmin(value, axis=1)
        return float(value[rows, best].sum() - lam * rhs), float(row[rows, best].sum()), value, best

    low, high = 0.0, 1.0
    if at(0.0)[1] > rhs:
        while at(high)[1] > rhs:
            low, high = high, high * 8
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (low + high)
            if at(mid)[1] > rhs:
                low = mid
            else:
                high = mid
    else:
        high = 0.0
    bound_low, _, value_low, _ = at(low)
    bound_high, _, value_high, feasible = at(high)
    bound, value = (bound_low, value_low) if bound_low >= bound_high else (bound_high, value_high)
    return Lagrangian(bound, value - value.min(axis=1, keepdims=True), feasible)


def reduced_cost_fixing(problem: Problem, dual: Lagrangian, incumbent: np.ndarray) -> np.ndarray:
    """Mask of the (unit, option) pairs that can still be in a solution at least as good as
    ``incumbent`` (see the module doc); the incumbent's own pairs are always kept."""
    rows = np.arange(problem.num_units)
    upper = float(problem.normalized_cost()[rows, incumbent].sum())
    keep = problem.allowed & (dual.reduced <= upper - dual.bound + 1e-9 * max(1.0, abs(upper)))
    keep[rows, incumbent] = True
    return keep


_TUNED_OPTIONS: dict[str, Any] = {
    # The model is tiny after fixing and the greedy incumbent is passed as a cutoff, so HiGHS'
    # primal heuristics (sub-MIPs, RINS/RENS, feasibility jump, ...) cost more than they find:
    # on 200 x 5 synthetic tables they take about half the time. Options scipy does not name are
    # passed to HiGHS verbatim; older HiGHS builds without them fall back to the plain options.
    "mip_heuristic_effort": 0.0,
    "mip_heuristic_run_rens": False,
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_feasibility_jump": False,
    "mip_heuristic_run_root_reduced_cost": False,
    "mip_heuristic_run_shifting": False,
    "mip_heuristic_run_zi_round": False,
}


def _milp(cost: np.ndarray, matrix: csr_array, lower: np.ndarray, upper: np.ndarray, options: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Unrecognized options ... passed verbatim"
        try:
            return milp(cost, constraints=LinearConstraint(matrix, lower, upper), integrality=np.ones(len(cost)), bounds=Bounds(0, 1), options=options)
        except (AttributeError, ValueError, KeyError):
            plain = {k: v for k, v in options.items() if k in ("mip_rel_gap", "time_limit")}
            return milp(cost, constraints=LinearConstraint(matrix, lower, upper), integrality=np.ones(len(cost)), bounds=Bounds(0, 1), options=plain)


def choose(
    problem: Problem, mip_rel_gap: float = 1e-9, time_limit: float = 60.0, reduce: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    # Incumbent: the Lagrangian argmin that fits (the LP optimum rounded down), then greedy fill.
    dual = lagrangian(problem)
    incumbent = fill(problem, downgrade(problem, dual.feasible_choice))
    keep = problem.allowed
    info: dict[str, Any] = {"variables": int(problem.allowed.sum())}
    options: dict[str, Any] = {"mip_rel_gap": mip_rel_gap, "time_limit": time_limit}
    if reduce:
        keep = reduced_cost_fixing(problem, dual, incumbent)
        info["variables_after_fixing"] = int(keep.sum())
        if (keep.sum(axis=1) == 1).all():  # only the incumbent survives: it is optimal
            info.update(status="optimal by reduced-cost fixing", optimal=True)
            return incumbent, info
        upper = float(problem.normalized_cost()[np.arange(problem.num_units), incumbent].sum())
        options.update(_TUNED_OPTIONS, objective_bound=upper + 1e-9 * max(1.0, abs(upper)))
    unit, option, cost, row, assign = model_arrays(problem, keep)
    matrix = vstack([assign, csr_array(row[None, :])]).tocsr()
    n_units = problem.num_units
    rhs = problem.budget_bits / problem.total_numel
    lower = np.concatenate([np.ones(n_units), [-np.inf]])
    choice = incumbent
    for attempt in range(_RETRIES + 1):
        result = _milp(cost, matrix, lower, np.concatenate([np.ones(n_units), [rhs]]), options)
        info.update(status=result.message, attempts=attempt + 1)
        if result.x is None:
            if "objective_bound" in options and result.status == 2:
                # nothing beats the cutoff: the incumbent is optimal (up to a tightened row)
                info.update(optimal=attempt == 0, status="no solution better than the incumbent")
                return incumbent, info
            raise BitallocError(f"HiGHS found no solution: {result.message}")
        choice = decode(problem, unit, option, result.x)
        info["optimal"] = bool(result.status == 0)
        over = problem.total_bits(choice) - problem.budget_bits
        if over <= 0:
            break
        rhs -= (over + 0.5) / problem.total_numel
    else:
        info["repaired"] = True
        choice = repair(problem, choice)
    if problem.total_cost(incumbent) < problem.total_cost(choice):  # only possible off-optimal
        choice = incumbent
    return choice, info


def solve(
    table: SensitivityTable,
    budget: Budget,
    constraints: Constraints = Constraints(),
    mip_rel_gap: float = 1e-9,
    time_limit: float = 60.0,
    reduce: bool = True,
) -> BitMap:
    """Optimal allocation (up to ``mip_rel_gap`` on the normalized objective) with HiGHS;
    ``reduce`` turns the exact reduced-cost fixing on (default) or off."""
    settings = {"mip_rel_gap": mip_rel_gap, "time_limit": time_limit, "reduce": reduce}
    return run_solver(NAME, choose, table, budget, constraints, settings)
