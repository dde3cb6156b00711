"""Greedy: start every layer at its widest option, then repeatedly lower the unit (layer or tie
group) whose move costs the least loss increase per saved bit, until the budget holds; finally
spend any slack on the best loss decrease per added bit.

On a table whose loss is convex and decreasing in bits this walks the lower convex hull of each
unit, so it stops at the LP-relaxation optimum with its one fractional unit rounded down: the
result is within that unit's loss jump of the optimum. No optimality guarantee otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from allocator.solvers.base import Budget, Constraints, Problem, run_solver
from allocator.solvers.repair import downgrade, fill
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable

NAME = "greedy"


def choose(problem: Problem, refill: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    choice = downgrade(problem, problem.heaviest())
    if refill:
        choice = fill(problem, choice)
    return choice, {}


def solve(table: SensitivityTable, budget: Budget, constraints: Constraints = Constraints(), refill: bool = True) -> BitMap:
    """Greedy allocation; ``refill`` spends the slack left after the last downgrade."""
    return run_solver(NAME, choose, table, budget, constraints, {"refill": refill})
