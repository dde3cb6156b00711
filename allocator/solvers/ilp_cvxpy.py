"""The same integer program as :mod:`allocator.solvers.ilp`, stated in cvxpy and solved by HiGHS.

Slower to set up than the scipy path (cvxpy canonicalizes the model first) but easy to extend
with further constraints. cvxpy is imported on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from allocator.errors import BitallocError
from allocator.solvers.base import Budget, Constraints, Problem, run_solver
from allocator.solvers.ilp import decode, model_arrays
from allocator.solvers.repair import repair
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable

NAME = "ilp-cvxpy"
_RETRIES = 3


def choose(problem: Problem, solver: str = "HIGHS", mip_rel_gap: float = 1e-9) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        import cvxpy as cp
    except ImportError:
        raise BitallocError("the ilp-cvxpy solver needs cvxpy (pip install cvxpy)") from None
    if solver not in cp.installed_solvers():
        raise BitallocError(f"cvxpy has no {solver} solver here; installed: {', '.join(cp.installed_solvers())}")
    unit, option, cost, row, assign = model_arrays(problem)
    x = cp.Variable(len(cost), boolean=True)
    bound = problem.budget_bits / problem.total_numel
    rhs = cp.Parameter(nonneg=True, value=bound)
    program = cp.Problem(cp.Minimize(cost @ x), [assign @ x == 1, row @ x <= rhs])
    options = {"mip_rel_gap": mip_rel_gap} if solver == "HIGHS" else {}
    info: dict[str, Any] = {}
    choice = problem.heaviest()
    for attempt in range(_RETRIES + 1):
        program.solve(solver=solver, **options)
        if x.value is None:
            raise BitallocError(f"cvxpy/{solver} found no solution: {program.status}")
        choice = decode(problem, unit, option, x.value)
        info = {"status": program.status, "optimal": program.status == cp.OPTIMAL, "attempts": attempt + 1}
        over = problem.total_bits(choice) - problem.budget_bits
        if over <= 0:
            return choice, info
        bound = max(bound - (over + 0.5) / problem.total_numel, 0.0)
        rhs.value = bound
    info["repaired"] = True
    return repair(problem, choice), info


def solve(
    table: SensitivityTable,
    budget: Budget,
    constraints: Constraints = Constraints(),
    solver: str = "HIGHS",
    mip_rel_gap: float = 1e-9,
) -> BitMap:
    """Optimal allocation through cvxpy (``solver`` any installed cvxpy MIP solver)."""
    return run_solver(NAME, choose, table, budget, constraints, {"solver": solver, "mip_rel_gap": mip_rel_gap})
