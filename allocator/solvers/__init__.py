"""Solvers: (sensitivity table, budget, constraints) -> bit map, one module per method.

Every solver module exposes ``solve(table, budget, constraints=Constraints(), **settings) -> BitMap``;
:func:`solve` dispatches by name. See :mod:`allocator.solvers.base` for the shared model.

- ``ilp``: exact, HiGHS through scipy.optimize.milp (the default);
- ``ilp-cvxpy``: the same model through cvxpy + HiGHS;
- ``convex``: LP relaxation + rounding + greedy repair (reports the LP lower bound);
- ``baq``: closed-form reverse water-filling on a fitted ``a 2^(-2b)`` loss model + rounding + repair;
- ``dp``: dynamic programming over a discretized budget (exact when bits are multiples of the step);
- ``greedy``: from the widest options down, least loss increase per saved bit.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from allocator.errors import BitallocError
from allocator.solvers import baq, convex, dp, greedy, ilp, ilp_cvxpy
from allocator.solvers.base import Budget, Constraints, Problem, build_problem
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable

SOLVERS: dict[str, Callable[..., BitMap]] = {
    ilp.NAME: ilp.solve,
    ilp_cvxpy.NAME: ilp_cvxpy.solve,
    convex.NAME: convex.solve,
    baq.NAME: baq.solve,
    dp.NAME: dp.solve,
    greedy.NAME: greedy.solve,
}
log = logging.getLogger(__name__)

DEFAULT_SOLVER = ilp.NAME
UNIFORM = "uniform"
"""Solver name of an allocation with one option on every layer (the uniform points of a sweep)."""


class Solver(Protocol):
    """Anything that allocates like the solvers here: a named solver bound by :func:`solve`, or a
    learned policy (``policies.solver.PolicySolver``), so every flow can take either."""

    name: str

    def __call__(self, table: SensitivityTable, budget: Budget, constraints: Constraints = ...) -> BitMap: ...


def solve(
    table: SensitivityTable,
    budget: Budget,
    constraints: Constraints = Constraints(),
    solver: str | Solver = DEFAULT_SOLVER,
    **settings: Any,
) -> BitMap:
    """Allocate options to the layers of ``table`` under ``budget`` with the named solver, or with a
    :class:`Solver` object (a trained policy)."""
    if not isinstance(solver, str):
        if settings:
            raise BitallocError(f"{solver.name} takes no solver settings")
        return solver(table, budget, constraints)
    if solver not in SOLVERS:
        raise BitallocError(f"unknown solver {solver!r}; choose from {', '.join(SOLVERS)}")
    function = SOLVERS[solver]
    known = set(inspect.signature(function).parameters) - {"table", "budget", "constraints"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise BitallocError(f"solver {solver} has no setting {unknown[0]!r}; it takes {', '.join(sorted(known)) or 'none'}")
    return function(table, budget, constraints, **settings)


def warn_if_above_widest(table: SensitivityTable, budget: Budget) -> None:
    """A budget above the widest allocation is met by giving every layer its widest option: say so,
    once per user request (the entry points call this, not :func:`solve`, which sweeps call per budget)."""
    widest = int(np.where(table.bits >= 0, table.bits, 0).max(axis=1).sum())
    if budget.max_bits(table.total_numel) > widest:
        log.warning("budget %s exceeds the widest allocation (%.4f bpw, %d bytes): every layer gets its widest option",
                    budget, widest / table.total_numel, -(-widest // 8) + budget.other_bytes)


__all__ = ["Budget", "Constraints", "Problem", "SOLVERS", "DEFAULT_SOLVER", "UNIFORM", "Solver", "build_problem", "solve", "warn_if_above_widest"]
