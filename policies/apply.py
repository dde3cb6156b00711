"""Zero-shot application: run a trained policy on a (new) model's table and return a bit map.

The policy walks the table's units once, deterministically (the mean action), exactly as in
training, at the requested budget. Its allocation is then made to fit: units are lowered by the
least loss increase per saved bit while it is over budget, and leftover bits are spent on the best
loss decrease per added bit (:func:`allocator.solvers.repair.repair`, the solvers' own repair), so
the bit map never exceeds the budget. :func:`allocator.solvers.base.finish` builds and checks the
bit map, which therefore looks like any solver's (solver name ``sac-policy``; its ``info`` says how
many units the repair changed and what the raw rollout used).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from allocator.solvers.base import Budget, Constraints, build_problem, finish
from allocator.solvers.repair import repair
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable
from envs.bitalloc_env import BitAllocEnv
from policies.artifact import LoadedPolicy, load_policy

NAME = "sac-policy"


def rollout(env: BitAllocEnv, act: Callable[[np.ndarray], np.ndarray], options: Mapping[str, Any]) -> dict[str, Any]:
    """One deterministic episode of ``env`` (reset with seed 0 and ``options``) under ``act``; the
    terminal ``info`` (``raw_choice``, ``raw_bits``, ...)."""
    observation, _ = env.reset(seed=0, options=dict(options))
    done, info = False, {}
    while not done:
        observation, _, done, _, info = env.step(act(observation))
    return info


def apply_policy(
    policy: LoadedPolicy | Path | str,
    table: SensitivityTable,
    budget: Budget | float,
    constraints: Constraints = Constraints(),
) -> BitMap:
    """Allocate ``table`` under ``budget`` (a :class:`Budget` or average bpw) with ``policy``.

    Raises a one-line :class:`~allocator.errors.BitallocError` for a policy whose feature schema
    differs from the table's, a missing or mismatched sidecar, or an infeasible budget.
    """
    start = time.perf_counter()
    if not isinstance(policy, LoadedPolicy):
        policy = load_policy(policy)
    policy.check_table(table)
    if not isinstance(budget, Budget):
        budget = Budget.bpw(float(budget))
    problem = build_problem(table, budget, constraints)
    env = BitAllocEnv(
        table,
        bpw_range=policy.card.bpw_range,
        constraints=constraints,
        reward=policy.card.reward,
        normalization=policy.card.normalization,
        action_mapping=policy.card.action_mapping,
    )
    info = rollout(env, policy.act, {"budget_bits": problem.budget_bits})
    raw = info["raw_choice"]
    choice = repair(problem, raw)
    details = {
        "rollout_bits": int(info["raw_bits"]),
        "rollout_bpw": info["raw_bits"] / problem.total_numel,
        "changed_by_repair": int((choice != raw).sum()),
        "units": problem.num_units,
    }
    settings = {
        "policy": str(policy.path),
        "policy_sha256": policy.card.zip_sha256,
        "trained_on": [m.get("model") for m in policy.card.models],
        "timesteps": policy.card.timesteps,
        "seed": policy.card.seed,
    }
    return finish(problem, choice, NAME, settings, time.perf_counter() - start, details)
