"""Exact integer program solved by HiGHS through :func:`scipy.optimize.milp`.

One binary x[u, o] per allowed (unit, option); ``sum_o x[u, o] = 1`` per unit; one knapsack row
``sum w[u, o] x[u, o] <= B``. Ties are already substituted (see :mod:`allocator.solvers.base`).
For numerics the knapsack row is written in bits per weight (bits / total weight count) and the
costs are normalized per unit (same argmin).

Units whose stored bits agree option by option (the same weight shape: every layer of a
transformer has the same q/k/v, o, gate/up and down shapes) form a *class*, and the budget row only
sees how many units of each class take each option. The MIP therefore has integer counts
``n[c, o] = sum_{u in c} x[u, o]`` in the budget row and *continuous* x: once the counts are fixed,
the x of a class lie in a transportation polytope (units -> option slots), whose constraint
matrix is totally unimodular, so every vertex is integral and branching on the few counts is
enough. A real 30-block model has 4 classes, so ~30 integer variables instead of ~500 binaries,
and none of the symmetric branching between interchangeable layers. The unit choice is read off by
solving each class's assignment for the optimal counts exactly (:func:`assign_class`).

Before the MIP, variables are removed by Lagrangian reduced-cost fixing, which keeps the result
exact: for any multiplier lambda >= 0, ``LB = sum_u min_o (c[u,o] + lambda w[u,o]) - lambda B`` is a
lower bound and every feasible x costs at least ``LB + sum of the reduced costs
c + lambda w - min_o(...)`` of its chosen pairs. lambda maximizes LB (bisection on the
subgradient). The incumbent is the Lagrangian argmin that fits (the LP optimum rounded down) after
a greedy fill, improved by pair exchanges (:func:`~allocator.solvers.repair.exchange`); with its
cost as upper bound UB, a pair whose reduced cost exceeds ``UB - LB`` is in no solution better than
the incumbent and is dropped, and UB is passed to HiGHS as objective cutoff with its primal
heuristics off.

HiGHS' feasibility tolerance can admit a few bits over the exact integer budget; the exact total
is checked and the row tightened by the overshoot and solved again (a last-resort greedy repair
keeps the result feasible).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linear_sum_assignment, milp
from scipy.sparse import csr_array, vstack

from allocator.errors import BitallocError
from allocator.solvers.base import Budget, Constraints, Problem, run_solver
from allocator.solvers.repair import downgrade, exchange, fill, repair
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable

NAME = "ilp"
_RETRIES = 3
_ROW_TOLERANCE = 2e-7
"""Budget-row tightening per retry, in bpw: twice HiGHS' default primal feasibility tolerance."""
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
    # Cuts barely move the bound of this knapsack but every kept cut makes each node's LP larger:
    # a cut pool of (softly) one cut was ~1.5x faster in median and 3x at worst on those tables.
    "mip_pool_soft_limit": 1,
}


def unit_classes(problem: Problem) -> np.ndarray:
    """Class index per unit: units with the same stored bits under every allowed option."""
    key = np.where(problem.allowed, problem.weight, -1)
    return np.unique(key, axis=0, return_inverse=True)[1].ravel()


@dataclass
class CountModel:
    """The MIP over the ``keep`` pairs: continuous x per (unit, option), integer n per (class, option)."""

    unit: np.ndarray
    option: np.ndarray
    cost: np.ndarray
    """Objective over [x, n] (n costs nothing)."""
    integrality: np.ndarray
    upper: np.ndarray
    """Variable upper bounds: 1 for x, the number of units that keep the option for n."""
    matrix: csr_array
    """Rows: one option per unit (= 1), class counts (x - n = 0), the budget row on n (last)."""
    count_class: np.ndarray
    count_option: np.ndarray
    count_bits: np.ndarray
    """Stored bits of one unit of the count's class under its option (int64)."""


def count_model(problem: Problem, keep: np.ndarray, classes: np.ndarray) -> CountModel:
    unit, option, cost, _, assign = model_arrays(problem, keep)
    pair_count, count_of_pair = np.unique(np.stack([classes[unit], option]), axis=1, return_inverse=True)
    count_of_pair = count_of_pair.ravel()
    n_x, n_n = len(unit), pair_count.shape[1]
    count_class, count_option = pair_count
    # any unit of the class gives the class's bits under that option
    representative = np.zeros(n_n, dtype=np.int64)
    representative[count_of_pair] = unit
    count_bits = problem.weight[representative, count_option]
    link = csr_array(
        (np.r_[np.ones(n_x), -np.ones(n_n)], (np.r_[count_of_pair, np.arange(n_n)], np.r_[np.arange(n_x), n_x + np.arange(n_n)])),
        shape=(n_n, n_x + n_n),
    )
    one_option = csr_array((assign.data, assign.indices, assign.indptr), shape=(problem.num_units, n_x + n_n))
    budget_row = csr_array(np.r_[np.zeros(n_x), count_bits / problem.total_numel][None, :])
    return CountModel(
        unit=unit,
        option=option,
        cost=np.r_[cost, np.zeros(n_n)],
        integrality=np.r_[np.zeros(n_x), np.ones(n_n)],
        upper=np.r_[np.ones(n_x), np.bincount(count_of_pair, minlength=n_n)],
        matrix=vstack([one_option, link, budget_row]).tocsr(),
        count_class=count_class,
        count_option=count_option,
        count_bits=count_bits,
    )


def assign_class(cost: np.ndarray, keep: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Least-cost option per unit of one class when option o must be taken ``counts[o]`` times
    (a linear assignment of the units to that many option slots)."""
    slots = np.repeat(np.arange(len(counts)), counts)
    big = 1.0 + 2.0 * float(np.abs(np.where(keep, cost, 0.0)).sum())  # worse than any allowed assignment
    matrix = np.where(keep[:, slots], cost[:, slots], big)
    rows, cols = linear_sum_assignment(matrix)
    choice = np.empty(cost.shape[0], dtype=np.int64)
    choice[rows] = slots[cols]
    if not keep[np.arange(len(choice)), choice].all():
        raise RuntimeError("the class counts admit no assignment of allowed options")
    return choice


def decode_counts(problem: Problem, keep: np.ndarray, classes: np.ndarray, model: CountModel, n: np.ndarray) -> np.ndarray:
    """Unit choice for integer class counts ``n``: each class assigned exactly (:func:`assign_class`)."""
    counts = np.zeros((classes.max() + 1, problem.weight.shape[1]), dtype=np.int64)
    counts[model.count_class, model.count_option] = np.rint(n).astype(np.int64)
    cost = problem.normalized_cost()
    choice = np.empty(problem.num_units, dtype=np.int64)
    for c in range(counts.shape[0]):
        members = np.flatnonzero(classes == c)
        if counts[c].sum() != len(members):
            raise RuntimeError(f"class {c}: counts {counts[c]} do not add up to its {len(members)} units")
        choice[members] = assign_class(cost[members], keep[members], counts[c])
    return choice


def _milp(model: CountModel, lower: np.ndarray, upper: np.ndarray, options: dict[str, Any]) -> Any:
    def run(opts: dict[str, Any]) -> Any:
        return milp(model.cost, constraints=LinearConstraint(model.matrix, lower, upper), integrality=model.integrality,
                    bounds=Bounds(0, model.upper), options=opts)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Unrecognized options ... passed verbatim"
        try:
            return run(options)
        except (AttributeError, ValueError, KeyError):
            return run({k: v for k, v in options.items() if k in ("mip_rel_gap", "time_limit")})


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
        # Fix with the greedy incumbent, improve it by pair exchanges among the survivors, fix again:
        # the closer UB is to the optimum, the fewer pairs survive and the less HiGHS must prove.
        keep = reduced_cost_fixing(problem, dual, incumbent)
        incumbent = exchange(problem, incumbent, keep)
        keep = reduced_cost_fixing(problem, dual, incumbent)
        info["variables_after_fixing"] = int(keep.sum())
        if (keep.sum(axis=1) == 1).all():  # only the incumbent survives: it is optimal
            info.update(status="optimal by reduced-cost fixing", optimal=True)
            return incumbent, info
        upper = float(problem.normalized_cost()[np.arange(problem.num_units), incumbent].sum())
        options.update(_TUNED_OPTIONS, objective_bound=upper + 1e-9 * max(1.0, abs(upper)))
    classes = unit_classes(problem)
    model = count_model(problem, keep, classes)
    info["integer_variables"] = len(model.count_bits)
    n_rows = model.matrix.shape[0]
    lower = np.r_[np.ones(problem.num_units), np.zeros(n_rows - problem.num_units - 1), -np.inf]
    row_upper = lower.copy()
    rhs = problem.budget_bits / problem.total_numel
    choice = incumbent
    for attempt in range(_RETRIES + 1):
        row_upper[-1] = rhs
        result = _milp(model, lower, row_upper, options)
        info.update(status=result.message, attempts=attempt + 1)
        if result.x is None:
            if "objective_bound" in options and result.status == 2:
                # nothing beats the cutoff: the incumbent is optimal (up to a tightened row)
                info.update(optimal=attempt == 0, status="no solution better than the incumbent")
                return incumbent, info
            if result.status == 1:  # time limit before any solution: the incumbent still fits
                info.update(optimal=False, status=f"time limit; the incumbent is returned ({result.message})")
                return incumbent, info
            raise BitallocError(f"HiGHS found no solution: {result.message}")
        n = result.x[len(model.unit):]
        choice = decode_counts(problem, keep, classes, model, n)
        info["optimal"] = bool(result.status == 0)
        # exact integer bits of the counts (the row is checked in floating point by HiGHS)
        over = int(model.count_bits @ np.rint(n).astype(np.int64)) - problem.budget_bits
        if over <= 0:
            break
        # HiGHS accepts the row up to its feasibility tolerance (~1e-7 bpw, i.e. ~1e-7 N bits), so
        # tighten by at least that much, doubling per attempt
        rhs -= max(over + 0.5, _ROW_TOLERANCE * problem.total_numel * 2**attempt) / problem.total_numel
    else:
        info.update(repaired=True, optimal=False)
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
