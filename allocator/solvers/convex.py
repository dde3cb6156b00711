"""LP relaxation + rounding + greedy repair.

The integer program of :mod:`allocator.solvers.ilp` with ``0 <= x <= 1`` instead of binaries is
solved by HiGHS' dual simplex. A vertex of the relaxed multiple-choice knapsack has at most one
unit split between two options; every unit takes its largest x, and :func:`~allocator.solvers.repair.repair`
lowers units until the budget holds and then spends the slack. The LP optimum is a lower bound on
the integer optimum and is reported as ``info["lp_bound"]`` (in the table's loss units).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import csr_array

from allocator.errors import BitallocError
from allocator.solvers.base import Budget, Constraints, Problem, run_solver
from allocator.solvers.ilp import decode, model_arrays
from allocator.solvers.repair import repair
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable

NAME = "convex"


def relax(problem: Problem) -> tuple[np.ndarray, float]:
    """Solve the LP relaxation; returns (x over the allowed pairs, LP optimum in loss units)."""
    unit, option, cost, row, assign = model_arrays(problem)
    result = linprog(
        cost,
        A_ub=csr_array(row[None, :]),
        b_ub=[problem.budget_bits / problem.total_numel],
        A_eq=assign,
        b_eq=np.ones(problem.num_units),
        bounds=(0, 1),
        method="highs-ds",
    )
    if result.x is None:
        raise BitallocError(f"HiGHS could not solve the LP relaxation: {result.message}")
    true_cost = problem.cost[unit, option]
    return result.x, float(true_cost @ result.x)


def choose(problem: Problem) -> tuple[np.ndarray, dict[str, Any]]:
    unit, option, *_ = model_arrays(problem)
    x, bound = relax(problem)
    fractional = int(((x > 1e-9) & (x < 1 - 1e-9)).sum())
    rounded = decode(problem, unit, option, x)
    choice = repair(problem, rounded)
    return choice, {"lp_bound": bound, "fractional_variables": fractional, "changed_by_repair": int((choice != rounded).sum())}


def solve(table: SensitivityTable, budget: Budget, constraints: Constraints = Constraints()) -> BitMap:
    """LP relaxation, rounding and greedy repair."""
    return run_solver(NAME, choose, table, budget, constraints, {})
