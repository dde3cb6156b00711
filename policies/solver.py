"""A trained policy as one more solver: ``solve(table, budget, solver=PolicySolver(policy))``, so
``bitalloc solve --policy`` and ``bitalloc run --policy`` go through the same flow as ``--solver``."""

from __future__ import annotations

from allocator.solvers import Budget, Constraints
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable
from policies.apply import NAME, apply_policy
from policies.artifact import LoadedPolicy, load_policy
from policies.pretrained import resolve


class PolicySolver:
    """Allocates with a loaded policy (deterministic rollout, then the solvers' budget repair)."""

    name = NAME

    def __init__(self, policy: LoadedPolicy) -> None:
        self.policy = policy

    @classmethod
    def load(cls, reference: str) -> PolicySolver:
        """A policy.zip, its run directory, or the name of a shipped policy; a bad one is refused in one line."""
        return cls(load_policy(resolve(reference)))

    def __call__(self, table: SensitivityTable, budget: Budget, constraints: Constraints = Constraints()) -> BitMap:
        return apply_policy(self.policy, table, budget, constraints)
