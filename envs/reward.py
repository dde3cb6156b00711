"""The reward of :class:`envs.bitalloc_env.BitAllocEnv`: quality first, then the budget.

An episode ends with an allocation ``x`` of one option per unit (tie group or layer) whose stored
bits before projection are ``W_raw``; if ``W_raw`` exceeds the budget ``B`` (in bits), ``x`` is
projected onto it (units lowered by the least loss increase per saved bit,
:func:`allocator.solvers.repair.downgrade`). With ``L(x)`` the quality loss of the projected
allocation (lower is better: the table's predicted loss, or the measured KL) and ``L_ref(B)`` the
reference loss at that budget, the terminal reward is::

    quality = -ln((L(x) + eps) / (L_ref(B) + eps))
    over    = max(W_raw / B - 1, 0)        under = max(1 - W_raw / B, 0)
    reward  = quality - over_weight * over - under_weight * under - cliff * [over > tolerance]

- ``L_ref(B)`` for the table backend is the optimum of the LP relaxation of the allocation problem
  at ``B`` (:class:`LPRelaxation`), a lower bound on every allocation that fits, so ``quality <= 0``
  and 0 means "as good as any solver can be". Dividing by it makes rewards of models with losses on
  different scales (and of budgets with very different achievable losses) comparable; the log keeps
  a bad allocation (a sensitive layer at 1 bit, 100x the optimum) from drowning every other signal.
  For the measured-KL backend ``L_ref(B)`` is the measured KL of a solver's allocation at ``B``
  (:mod:`envs.quality`), so a positive quality means the policy beat that solver.
- ``eps`` is ``1e-6`` times the reference loss of the lightest allocation: it only keeps the ratio
  finite when a budget allows zero loss.
- The budget penalty is on the allocation *before* projection, so the policy learns to keep the
  budget itself instead of leaning on the projection: overshoot costs ``over_weight`` (default 4)
  per unit of relative excess, undershoot (bits left unused, which the quality term already
  punishes) only ``under_weight`` (default 1), and an overshoot beyond ``tolerance`` (default 5%)
  falls off a cliff of ``cliff`` (default 2, the quality gap of an allocation about 7x the optimum).

Intermediate rewards are 0 by default (sparse, as in HAQ). With ``dense=True`` each step gets a
shaped reward ``-(c_u(o) - c*_u(B)) / L*(B)``: the table loss of the unit's chosen option ``o``
above its share ``c*_u(B)`` of the LP-relaxation optimum ``L*(B)``, and the last step gets the
terminal reward minus the sum of the shaped rewards already paid, so the undiscounted return of an
episode is the same in both modes; dense only pays the credit earlier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from allocator.errors import BitallocError
from allocator.solvers.base import Problem


@dataclass(frozen=True)
class RewardConfig:
    """Weights of the budget terms of the reward (see the module doc)."""

    over_weight: float = 4.0
    """Penalty per unit of relative overshoot (``W_raw / B - 1``) before projection."""
    under_weight: float = 1.0
    """Penalty per unit of relative undershoot (``1 - W_raw / B``)."""
    tolerance: float = 0.05
    """Relative overshoot beyond which the cliff applies."""
    cliff: float = 2.0
    """Extra penalty once the overshoot exceeds ``tolerance``."""
    dense: bool = False
    """Shape intermediate rewards by the LP-relaxation share of each unit (same undiscounted return)."""

    def __post_init__(self) -> None:
        for name in ("over_weight", "under_weight", "tolerance", "cliff"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise BitallocError(f"reward {name} must be a finite number >= 0, got {value!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewardConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise BitallocError(f"unknown reward setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**dict(data))


def budget_penalty(raw_bits: int, budget_bits: int, config: RewardConfig) -> float:
    """The (non-negative) budget part of the reward for ``raw_bits`` used of ``budget_bits``."""
    usage = raw_bits / budget_bits
    over = max(usage - 1.0, 0.0)
    under = max(1.0 - usage, 0.0)
    penalty = config.over_weight * over + config.under_weight * under
    if over > config.tolerance:
        penalty += config.cliff
    return penalty


def quality_reward(loss: float, reference: float, eps: float) -> float:
    """``-ln((loss + eps) / (reference + eps))``: 0 at the reference, negative above it."""
    return -math.log((max(loss, 0.0) + eps) / (max(reference, 0.0) + eps))


def terminal_reward(loss: float, reference: float, eps: float, raw_bits: int, budget_bits: int, config: RewardConfig) -> float:
    """The episode's reward (see the module doc)."""
    return quality_reward(loss, reference, eps) - budget_penalty(raw_bits, budget_bits, config)


class LPRelaxation:
    """The LP relaxation of a problem's multiple-choice knapsack as a function of the budget.

    Relaxed, every unit may mix two neighbouring options of the lower convex hull of its
    (bits, loss) points, and the optimum at budget ``B`` starts every unit at its lightest option
    and buys hull segments in order of the steepest loss decrease per bit until ``B`` is spent (the
    last one in part). So ``bound(B)`` is a piecewise-linear, convex, non-increasing function of
    ``B``, computed once per table by sorting segments; it equals the LP optimum of
    :func:`allocator.solvers.convex.relax` and is at most the integer optimum.
    """

    def __init__(self, problem: Problem) -> None:
        units, starts, gains, costs, slopes = [], [], [], [], []
        start_bits = np.zeros(problem.num_units, dtype=np.float64)
        start_cost = np.zeros(problem.num_units, dtype=np.float64)
        for u in range(problem.num_units):
            allowed = np.flatnonzero(problem.allowed[u])
            points = sorted(zip(problem.weight[u, allowed].astype(np.float64), problem.cost[u, allowed]))
            hull = _lower_hull(points)
            start_bits[u], start_cost[u] = hull[0]
            for (w0, c0), (w1, c1) in zip(hull, hull[1:]):
                units.append(u)
                starts.append(w0)
                gains.append(w1 - w0)
                costs.append(c1 - c0)
                slopes.append((c1 - c0) / (w1 - w0))
        # Steepest loss decrease per bit first; within a unit the hull's slopes already rise, and
        # the stable sort on (slope, unit, position) keeps each unit's segments in hull order.
        order = np.lexsort((np.arange(len(slopes)), np.asarray(units, dtype=np.int64), np.asarray(slopes)))
        self.segment_unit = np.asarray(units, dtype=np.int64)[order]
        self.segment_bits = np.asarray(gains, dtype=np.float64)[order]
        self.segment_cost = np.asarray(costs, dtype=np.float64)[order]
        self.start_bits = start_bits
        self.start_cost = start_cost
        self.min_bits = float(start_bits.sum())
        self.breakpoint_bits = self.min_bits + np.concatenate([[0.0], np.cumsum(self.segment_bits)])
        self.breakpoint_cost = float(start_cost.sum()) + np.concatenate([[0.0], np.cumsum(self.segment_cost)])

    def bound(self, budget_bits: float) -> float:
        """The LP optimum at ``budget_bits`` (the lightest allocation's loss below its bits)."""
        return float(np.interp(budget_bits, self.breakpoint_bits, self.breakpoint_cost))

    def unit_costs(self, budget_bits: float) -> np.ndarray:
        """Per unit its loss in the LP optimum at ``budget_bits`` (sums to :meth:`bound`)."""
        costs = self.start_cost.copy()
        spend = max(float(budget_bits) - self.min_bits, 0.0)
        full = int(np.searchsorted(np.cumsum(self.segment_bits), spend, side="right"))
        np.add.at(costs, self.segment_unit[:full], self.segment_cost[:full])
        if full < len(self.segment_bits):
            used = float(self.segment_bits[:full].sum())
            fraction = (spend - used) / self.segment_bits[full]
            costs[self.segment_unit[full]] += fraction * self.segment_cost[full]
        return costs


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower-left convex hull of (bits, loss) points sorted by bits: from the lightest point (the
    cheapest on equal bits) through the points where the loss falls at a diminishing rate per bit.
    Points with more bits and no less loss than one before are never on it."""
    hull: list[tuple[float, float]] = []
    for w, c in points:
        if hull and w == hull[-1][0]:
            continue  # same bits, no less loss (sorted by loss second): dominated
        if hull and c >= hull[-1][1]:
            continue  # more bits, no less loss: dominated
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], (w, c)) <= 0:
            hull.pop()  # hull[-1] lies on or above the chord from hull[-2] to the new point
        hull.append((w, c))
    return hull


def _cross(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float]) -> float:
    """> 0 when a -> b -> c turns left (b lies below the chord a-c, so it stays on a lower hull)."""
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
