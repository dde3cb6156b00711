"""What every solver shares: the budget, the constraints, and the reduced problem they solve.

All solvers solve the same multiple-choice knapsack::

    minimize  sum_l sum_o loss[l, o] x[l, o]
    s.t.      sum_o x[l, o] = 1                  (one option per layer)
              sum_l sum_o bits[l, o] x[l, o] <= B  (the budget, in exact stored bits)
              x[l, .] = x[m, .] for tied l, m      (one option per tie group)
              x[l, o] = 0 where o is not usable for l (NaN loss, not applicable, min/max bpw)

Ties are applied by substitution: every tie group (or, with ties off, every layer) becomes one
*unit* whose cost and bits under option o are the sums over its layers, so a unit choice is
exactly a tied choice and the model is smaller. :func:`build_problem` does this reduction and the
feasibility check; :func:`finish` turns a unit choice back into a :class:`~allocator.table.bitmap.BitMap`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

from allocator.errors import BitallocError
from allocator.table.bitmap import BitMap, ModuleEntry, SolverRecord
from allocator.table.sensitivity import SensitivityTable

_BPW_TOLERANCE = 1e-9


MAX_BPW = 1000.0
"""Largest bpw budget taken: past the widest option a budget only says "everything at its widest" (and
solve says so); past this it is a typo, and inf or 1e308 would overflow the exact budget arithmetic."""
MAX_BYTES = 2**50
"""Largest byte budget taken (a petabyte); larger numbers lose precision in the solvers' floats."""


@dataclass(frozen=True)
class Budget:
    """A size budget for the quantized layers: average bits per weight or total bytes.

    ``Budget.bpw(2.5)`` allows ``floor(2.5 * total weight count)`` stored bits over the layers of the
    table. ``Budget.bytes(n)`` allows ``8 * n`` bits; with ``other_bytes`` (the tensors outside the
    table: embeddings, LM head, norms) ``n`` is the whole-model size and those bytes are taken off.
    """

    kind: str
    value: float
    other_bytes: int = 0

    @classmethod
    def bpw(cls, value: float) -> Budget:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= MAX_BPW):
            raise BitallocError(f"a bpw budget must be a number in (0, {MAX_BPW:g}], got {value}")
        return cls("bpw", float(value))

    @classmethod
    def bytes(cls, value: int, other_bytes: int = 0) -> Budget:
        if not (0 < value <= MAX_BYTES and 0 <= other_bytes <= MAX_BYTES):
            raise BitallocError(f"a byte budget must be in (0, {MAX_BYTES}] (got {value}, other bytes {other_bytes})")
        return cls("bytes", int(value), int(other_bytes))

    def max_bits(self, total_numel: int) -> int:
        """The budget in stored bits of the quantized layers."""
        if self.kind == "bpw":
            # exact decimal arithmetic: 2.5 bpw over N weights is floor(2.5 * N), not off by one
            return math.floor(Fraction(repr(self.value)) * total_numel)
        if self.kind == "bytes":
            return 8 * (int(self.value) - self.other_bytes)
        raise BitallocError(f"unknown budget kind {self.kind!r} (bpw or bytes)")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "value": self.value}
        if self.other_bytes:
            out["other_bytes"] = self.other_bytes
        return out

    def __str__(self) -> str:
        if self.kind == "bpw":
            return f"{self.value:g} bpw"
        extra = f" (with {self.other_bytes} other bytes)" if self.other_bytes else ""
        return f"{int(self.value)} bytes{extra}"


BpwLimit = float | Mapping[str, float] | None
"""A per-layer bpw limit: one number for every layer, or ``{regex: bpw}`` matched with
``re.fullmatch`` against module names (the tightest matching limit applies)."""


@dataclass(frozen=True)
class Constraints:
    """What restricts a solution besides the budget."""

    loss: str | None = None
    """Loss matrix to minimize (default: the table's first)."""
    tie: bool = True
    """Tie groups take one option (default on, as for GGUF/vLLM-style fused q/k/v and gate/up)."""
    min_bpw: BpwLimit = None
    """Options below this many bits per weight (of the layer's own storage) are not allowed."""
    max_bpw: BpwLimit = None
    """Options above this many bits per weight are not allowed."""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"loss": self.loss, "tie": self.tie}
        for key in ("min_bpw", "max_bpw"):
            value = getattr(self, key)
            if value is not None:
                out[key] = dict(value) if isinstance(value, Mapping) else value
        return out


@dataclass
class Problem:
    """The reduced multiple-choice knapsack over units (tie groups or single layers)."""

    table: SensitivityTable
    budget: Budget
    constraints: Constraints
    loss_name: str
    units: list[np.ndarray]
    """Layer indices of each unit."""
    cost: np.ndarray
    """U x O summed loss; +inf where the option is not allowed for the unit."""
    weight: np.ndarray
    """U x O summed stored bits (int64); 0 where not allowed."""
    allowed: np.ndarray
    """U x O mask."""
    numel: np.ndarray
    """U weight counts."""
    budget_bits: int
    min_bits: int = 0
    max_bits: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_units(self) -> int:
        return len(self.units)

    @property
    def total_numel(self) -> int:
        return int(self.numel.sum())

    def total_bits(self, choice: np.ndarray) -> int:
        return int(self.weight[np.arange(self.num_units), choice].sum())

    def total_cost(self, choice: np.ndarray) -> float:
        return float(self.cost[np.arange(self.num_units), choice].sum())

    def lightest(self) -> np.ndarray:
        """Per unit the allowed option with the fewest bits (the cheaper loss on equal bits)."""
        return _argbest(self.allowed, self.weight, self.cost, largest=False)

    def heaviest(self) -> np.ndarray:
        """Per unit the allowed option with the most bits (the cheaper loss on equal bits)."""
        return _argbest(self.allowed, self.weight, self.cost, largest=True)

    def normalized_cost(self) -> np.ndarray:
        """Costs shifted per unit to start at 0 and scaled to mean unit range 1 (same argmin; keeps
        LP/MIP tolerances meaningful whatever the loss scale). +inf stays where not allowed."""
        finite = np.where(self.allowed, self.cost, np.nan)
        low = np.nanmin(finite, axis=1, keepdims=True)
        spread = np.nanmax(finite, axis=1, keepdims=True) - low
        scale = float(np.mean(spread)) or 1.0
        return np.where(self.allowed, (self.cost - low) / scale, np.inf)


def _argbest(allowed: np.ndarray, weight: np.ndarray, cost: np.ndarray, largest: bool) -> np.ndarray:
    w = np.where(allowed, weight if largest else -weight, np.iinfo(np.int64).min).astype(np.float64)
    best_w = w.max(axis=1, keepdims=True)
    tied = allowed & (w == best_w)
    return np.argmin(np.where(tied, cost, np.inf), axis=1)


def _limits(limit: BpwLimit, names: list[str], default: float, tighter: Callable[..., np.ndarray], what: str) -> np.ndarray:
    out = np.full(len(names), default, dtype=np.float64)
    if limit is None:
        return out
    if not isinstance(limit, Mapping):
        out[:] = float(limit)
        return out
    for pattern, value in limit.items():
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise BitallocError(f"bad {what} pattern {pattern!r}: {exc}") from None
        hits = np.array([regex.fullmatch(n) is not None for n in names])
        if not hits.any():
            raise BitallocError(f"{what} pattern {pattern!r} matches no layer of the table")
        out[hits] = tighter(out[hits], float(value))
    return out


def build_problem(table: SensitivityTable, budget: Budget, constraints: Constraints = Constraints()) -> Problem:
    """Reduce (table, budget, constraints) to units; raise if no allocation fits the budget."""
    loss = table.loss(constraints.loss)
    loss_name = constraints.loss or table.default_loss
    layer_ok = table.available(loss_name)
    bpw = table.bits / table.numel[:, None]
    low = _limits(constraints.min_bpw, table.names, -np.inf, np.maximum, "min_bpw")
    high = _limits(constraints.max_bpw, table.names, np.inf, np.minimum, "max_bpw")
    layer_ok &= (bpw >= low[:, None] - _BPW_TOLERANCE) & (bpw <= high[:, None] + _BPW_TOLERANCE)
    for i in np.flatnonzero(~layer_ok.any(axis=1)):
        raise BitallocError(f"no option is allowed for {table.names[i]} (check its losses and the min/max bpw limits)")

    if constraints.tie:
        _, unit_of_layer = np.unique(table.tie_group, return_inverse=True)
    else:
        unit_of_layer = np.arange(table.num_layers)
    num_units = int(unit_of_layer.max()) + 1
    order = np.argsort(unit_of_layer, kind="stable")
    units = np.split(order, np.cumsum(np.bincount(unit_of_layer, minlength=num_units))[:-1])
    # An option is allowed for a unit when it is allowed for every member.
    allowed = np.ones((num_units, table.num_options), dtype=bool)
    np.logical_and.at(allowed, unit_of_layer, layer_ok)
    for u in np.flatnonzero(~allowed.any(axis=1)):
        members = ", ".join(table.names[i] for i in units[u])
        raise BitallocError(f"tied layers {members} have no option allowed for all of them")
    cost = np.zeros((num_units, table.num_options))
    np.add.at(cost, unit_of_layer, np.where(layer_ok, loss, 0.0))
    cost[~allowed] = np.inf
    weight = np.zeros((num_units, table.num_options), dtype=np.int64)
    np.add.at(weight, unit_of_layer, np.where(layer_ok, table.bits, 0))
    weight[~allowed] = 0
    numel = np.bincount(unit_of_layer, weights=table.numel, minlength=num_units).astype(np.int64)
    budget_bits = budget.max_bits(table.total_numel)
    problem = Problem(table, budget, constraints, loss_name, units, cost, weight, allowed, numel, budget_bits)
    problem.min_bits = problem.total_bits(problem.lightest())
    problem.max_bits = problem.total_bits(problem.heaviest())
    if problem.min_bits > budget_bits:
        n = table.total_numel
        raise BitallocError(
            f"budget {budget} is infeasible: with these constraints the feasible range is "
            f"{problem.min_bits / n:.4f} to {problem.max_bits / n:.4f} bpw "
            f"({math.ceil(problem.min_bits / 8) + budget.other_bytes} to {math.ceil(problem.max_bits / 8) + budget.other_bytes} bytes)"
        )
    return problem


def finish(problem: Problem, choice: np.ndarray, name: str, settings: Mapping[str, Any], seconds: float, info: Mapping[str, Any] | None = None) -> BitMap:
    """Check a unit choice against the budget and constraints and build its bit map."""
    choice = np.asarray(choice, dtype=np.int64)
    if choice.shape != (problem.num_units,) or not problem.allowed[np.arange(problem.num_units), choice].all():
        raise RuntimeError(f"solver {name} returned an option that is not allowed")
    if problem.total_bits(choice) > problem.budget_bits:
        raise RuntimeError(f"solver {name} returned an allocation over the budget")
    table = problem.table
    layer_choice = np.empty(table.num_layers, dtype=np.int64)
    for unit, members in enumerate(problem.units):
        layer_choice[members] = choice[unit]
    loss = table.loss(problem.loss_name)
    modules = {}
    for i, layer in enumerate(table.names):
        option = table.options[layer_choice[i]]
        modules[layer] = ModuleEntry(
            option=option.label,
            settings=dict(option.settings),
            storage_bits=int(table.bits[i, layer_choice[i]]),
            numel=int(table.numel[i]),
        )
    predicted = float(loss[np.arange(table.num_layers), layer_choice].sum())
    budget = {**problem.budget.as_dict(), "bits": problem.budget_bits}
    record_settings = {**dict(settings), "constraints": problem.constraints.as_dict()}
    return BitMap(
        model=table.key.model,
        modules=modules,
        predicted_loss=predicted,
        loss_name=problem.loss_name,
        solver=SolverRecord(name=name, settings=record_settings, seconds=seconds, info=dict(info or {})),
        budget=budget,
        table_key=table.key.digest(),
    )


ChooseFn = Callable[..., tuple[np.ndarray, dict[str, Any]]]


def run_solver(
    name: str,
    choose: ChooseFn,
    table: SensitivityTable,
    budget: Budget,
    constraints: Constraints,
    settings: Mapping[str, Any],
) -> BitMap:
    """Time ``choose(problem, **settings) -> (unit choice, info)`` (problem building included)."""
    start = time.perf_counter()
    problem = build_problem(table, budget, constraints)
    choice, info = choose(problem, **settings)
    seconds = time.perf_counter() - start
    return finish(problem, choice, name, settings, seconds, info)
