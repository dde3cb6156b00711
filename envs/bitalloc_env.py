"""The allocation environment: one episode allocates every layer of one model under one budget.

An episode walks the *units* of a sensitivity table in layer order: with ties on (the default, as
the solvers and GGUF/vLLM-style runtimes fuse them) a unit is a tie group (q/k/v of a block, then
o, then gate/up, then down), so a tied group takes one option in one step; with
``Constraints(tie=False)`` a unit is a single layer. Per step:

- observation: the unit's features and the budget state (:mod:`envs.observation`, listed in
  ``envs/FEATURES.md``), a float32 vector in ``Box(-10, 10)``;
- action: ``Box(0, 1, shape=(1,))``. The unit's usable options are reduced to the ones not
  dominated in (stored bits, table loss) (more bits always buys less predicted loss), sorted by
  bits, and the action picks one of those ``n`` by the environment's ``action_mapping``:

  - ``"index"`` (the default): option ``min(floor(a * n), n - 1)``, so 0 is the lightest, 1 the
    heaviest and every option owns an equal share of the interval;
  - ``"price"``: ``a`` scales a price on bits. At step ``t`` the LP relaxation of the units not yet
    allocated (:class:`envs.reward.LPRelaxation`: hull segments bought in order of the steepest
    loss decrease per bit) spends the bits still left at a price ``mu*_t``, the loss decrease per
    bit of the last segment it buys (infinite when even the lightest options do not fit, 0 when
    the heaviest do). The action sets ``mu = mu*_t * exp(PRICE_RANGE * (1 - 2a))`` and the unit
    takes the option minimizing ``loss + mu * bits`` (the lightest on ties): a higher action buys
    more bits, from the lightest option at ``mu = inf`` to the heaviest at 0. So ``a = 0.5`` paces
    the budget by the relaxation of what is left, and the policy learns where to pay more or less
    than that price; ``mu`` is in the table's own loss units, so an action means the same on
    models whose losses differ in scale.

With ``reward_tables`` (one per table: the same layers, options and bits) the policy observes and acts on
``tables`` but is rewarded on the reward tables' loss (``reward_loss``, default their own default). That is the
features-only training of RAMP's zero-shot setting: observe a features table (:mod:`allocator.measure.features_pass`,
nothing measured), be scored on the measured table of the same model; applied to a new model, the policy needs
only that model's features table.

The budget is drawn per episode, uniformly in stored bits over ``bpw_range`` clipped to the
table's feasible range (the lightest to the heaviest non-dominated allocation), so one policy
serves many budgets; ``reset(options={"bpw": b})`` (or ``{"budget_bits": n}``) fixes it and
``{"table": i}`` the table. Given several tables, one is drawn per episode (multi-model training);
their observations must have the same layer features.

After the last step an allocation over the budget is projected onto it
(:func:`allocator.solvers.repair.downgrade`: lower the unit with the least loss increase per saved
bit until it fits) and rewarded by :mod:`envs.reward` with the chosen quality backend
(:mod:`envs.quality`). The terminal ``info`` carries the unit choice before and after projection,
the bits, the loss and the reference loss. All randomness comes from the generator seeded by
``reset(seed=...)``; the tables are never modified.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from allocator.errors import BitallocError
from allocator.solvers.base import Budget, Constraints, Problem, build_problem
from allocator.solvers.repair import downgrade
from allocator.table.sensitivity import SensitivityTable
from envs.observation import (
    BPW_SCALE,
    BUDGET_FEATURES,
    OBS_CLIP,
    FeatureNormalization,
    check_same_features,
    observation_names,
    observation_version,
    unit_observations,
)
from envs.quality import QualityBackend, TableQuality
from envs.reward import LPRelaxation, RewardConfig, terminal_reward

DEFAULT_BPW_RANGE = (1.5, 4.0)


def pareto_options(problem: Problem) -> list[np.ndarray]:
    """Per unit the allowed options not dominated in (bits, loss), lightest first."""
    out = []
    for u in range(problem.num_units):
        allowed = np.flatnonzero(problem.allowed[u])
        order = allowed[np.lexsort((problem.cost[u, allowed], problem.weight[u, allowed]))]
        kept: list[int] = []
        for o in order:
            if not kept or (problem.weight[u, o] > problem.weight[u, kept[-1]] and problem.cost[u, o] < problem.cost[u, kept[-1]]):
                kept.append(int(o))
        out.append(np.asarray(kept, dtype=np.int64))
    return out


ACTION_MAPPINGS = ("index", "price")
"""How an action in [0, 1] picks a unit's option (module doc)."""


def action_to_index(action: float, count: int) -> int:
    """Position among ``count`` options (lightest first) of an action in [0, 1] (``"index"`` mapping)."""
    return min(int(action * count), count - 1)


PRICE_RANGE = 0.3
"""``"price"`` mapping: the action scales the paced price by ``exp(±PRICE_RANGE)`` at its ends."""


def paced_price(relaxation: LPRelaxation, first_unit: int, bits_left: float) -> float:
    """``mu*``: the loss decrease per bit of the last hull segment the LP relaxation of units
    ``first_unit`` on buys with ``bits_left`` (inf when their lightest options do not fit, 0 when
    all their segments do)."""
    spend = bits_left - float(relaxation.start_bits[first_unit:].sum())
    if spend < 0:
        return math.inf
    segments = np.flatnonzero(relaxation.segment_unit >= first_unit)  # in the relaxation's buying order
    spent = np.cumsum(relaxation.segment_bits[segments])
    if not len(spent) or spend >= spent[-1]:
        return 0.0
    last = segments[int(np.searchsorted(spent, spend, side="right"))]
    return max(-float(relaxation.segment_cost[last] / relaxation.segment_bits[last]), 0.0)


def price_choice(costs: np.ndarray, bits: np.ndarray, paced: float, action: float) -> int:
    """Position (lightest first) of the option minimizing ``cost + mu * bits`` with ``mu`` the
    paced price scaled down by a higher action (``"price"`` mapping); the lightest when ``mu`` is infinite."""
    if math.isinf(paced):
        return 0
    mu = paced * math.exp(PRICE_RANGE * (1.0 - 2.0 * action))  # a higher action buys more bits, as with "index"
    return int(np.argmin(costs + mu * bits))  # first minimum: options are sorted lightest first


@dataclass
class _Model:
    """What the environment precomputes for one table."""

    table: SensitivityTable
    problem: Problem
    """The units, costs and bits at a slack budget; each episode copies it with its own budget."""
    options: list[np.ndarray]
    static: np.ndarray
    """U x (F + unit features) budget-independent observation part."""
    relaxation: LPRelaxation
    quality: QualityBackend
    min_bits: int
    max_bits: int
    low_bits: int
    high_bits: int
    """Range the episode budgets are drawn from (bits)."""
    option_bits: np.ndarray
    """U x 2: bits of each unit's lightest and heaviest non-dominated option."""
    eps: float
    reward_problem: Problem
    """The problem the reward is computed on: ``problem`` itself, or the reward table's (same units and bits)."""
    reward_relaxation: LPRelaxation


def check_reward_table(table: SensitivityTable, reward_table: SensitivityTable) -> None:
    """A reward table must describe the same layers (and tie groups) with the same options at the same bits as the observed table,
    so both give the same units at the same bits."""
    if (reward_table.names != table.names or reward_table.labels != table.labels or not np.array_equal(reward_table.bits, table.bits)
            or not np.array_equal(reward_table.tie_group, table.tie_group)):
        raise BitallocError(f"the reward table of {reward_table.key.model} has other layers, options, bits or tie groups than the "
                            f"table of {table.key.model}")


def _load(table: SensitivityTable | str | Path) -> SensitivityTable:
    return table if isinstance(table, SensitivityTable) else SensitivityTable.load(table)


class BitAllocEnv(gym.Env[np.ndarray, np.ndarray]):
    """Allocate one option per unit of a sensitivity table under a size budget (see the module doc).

    :param tables: one sensitivity table (or ``.npz`` path), or several to draw one per episode.
    :param bpw_range: range of the per-episode budget in average bits per weight.
    :param constraints: loss to use, ties, min/max bpw (as for the solvers).
    :param reward: weights of the budget terms and dense shaping (:class:`envs.reward.RewardConfig`).
    :param normalization: layer-feature normalization; default: fitted on ``tables``.
    :param quality: ``"table"``, or one backend per table (e.g. :class:`envs.quality.KLQuality`).
    :param render_mode: ``None`` or ``"ansi"``.
    :param action_mapping: ``"index"`` or ``"price"`` (module doc).
    :param reward_tables: one table per table whose loss the reward is computed on (module doc); default: ``tables``.
    :param reward_loss: the loss of the reward tables (default: each one's default loss).
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(
        self,
        tables: SensitivityTable | str | Path | Sequence[SensitivityTable | str | Path],
        bpw_range: tuple[float, float] = DEFAULT_BPW_RANGE,
        constraints: Constraints = Constraints(),
        reward: RewardConfig = RewardConfig(),
        normalization: FeatureNormalization | None = None,
        quality: str | Sequence[QualityBackend] = "table",
        render_mode: str | None = None,
        action_mapping: str = "index",
        reward_tables: Sequence[SensitivityTable | str | Path] | None = None,
        reward_loss: str | None = None,
    ) -> None:
        super().__init__()
        if action_mapping not in ACTION_MAPPINGS:
            raise BitallocError(f"action mapping {action_mapping!r}: one of {', '.join(ACTION_MAPPINGS)}")
        self.action_mapping = action_mapping
        loaded = [_load(t) for t in ([tables] if isinstance(tables, (SensitivityTable, str, Path)) else tables)]
        if not loaded:
            raise BitallocError("the environment needs at least one sensitivity table")
        for table in loaded[1:]:
            check_same_features(loaded[0], table)
        versions = {observation_version(table) for table in loaded}
        if len(versions) > 1:
            raise BitallocError("the tables mix features tables and measured profiles; a policy observes one kind")
        self.observation_version = versions.pop()
        scored: list[SensitivityTable | None] = [None] * len(loaded)
        if reward_tables is not None:
            scored = [_load(t) for t in reward_tables]
            if len(scored) != len(loaded):
                raise BitallocError(f"{len(scored)} reward tables for {len(loaded)} tables")
            for table, reward_table in zip(loaded, scored):
                check_reward_table(table, reward_table)
        if reward_tables is None and reward_loss is not None:
            raise BitallocError("reward_loss applies to reward_tables only (the tables' own loss is the constraints' loss)")
        low, high = (float(b) for b in bpw_range)
        if not 0 < low <= high:
            raise BitallocError(f"the bpw range must satisfy 0 < low <= high, got {bpw_range}")
        if isinstance(quality, str):
            if quality != "table":
                raise BitallocError(f"quality {quality!r}: pass 'table' or one backend per table (envs.quality.KLQuality for measured KL)")
            backends: list[QualityBackend | None] = [None] * len(loaded)
        else:
            backends = list(quality)
            if len(backends) != len(loaded):
                raise BitallocError(f"{len(backends)} quality backends for {len(loaded)} tables")
        if render_mode not in (None, "ansi"):
            raise BitallocError(f"render mode {render_mode!r}: only 'ansi'")
        self.render_mode = render_mode
        self.bpw_range = (low, high)
        self.constraints = constraints
        self.reward_config = reward
        self.normalization = normalization or FeatureNormalization.fit(loaded)
        self.models = [self._prepare(table, backend, reward_table, reward_loss) for table, backend, reward_table in zip(loaded, backends, scored)]
        self.observation_names = observation_names(loaded[0].feature_names)
        self.observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(len(self.observation_names),), dtype=np.float32)
        self.action_space = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self._model: _Model | None = None
        self._problem: Problem | None = None
        self._reward_problem: Problem | None = None

    def _prepare(self, table: SensitivityTable, backend: QualityBackend | None, reward_table: SensitivityTable | None,
                 reward_loss: str | None) -> _Model:
        self.normalization.check(table)
        widest = float(np.nanmax(table.bpw))
        slack = Budget.bpw(widest + 1.0)  # every allocation fits
        problem = build_problem(table, slack, self.constraints)
        # same layers, bits and tie groups (check_reward_table), so the same units at the same bits
        reward_problem = problem if reward_table is None else build_problem(reward_table, slack, dataclasses.replace(self.constraints, loss=reward_loss))
        options = pareto_options(problem)
        rows = np.arange(problem.num_units)
        option_bits = np.stack([problem.weight[rows, [o[0] for o in options]], problem.weight[rows, [o[-1] for o in options]]], axis=1)
        min_bits, max_bits = int(option_bits[:, 0].sum()), int(option_bits[:, 1].sum())
        total = table.total_numel
        low = min(max(Budget.bpw(self.bpw_range[0]).max_bits(total), min_bits), max_bits)
        high = min(max(Budget.bpw(self.bpw_range[1]).max_bits(total), low), max_bits)
        relaxation = LPRelaxation(problem)
        reward_relaxation = relaxation if reward_problem is problem else LPRelaxation(reward_problem)
        quality = backend if backend is not None else TableQuality(reward_relaxation)
        light = np.array([o[0] for o in options])
        eps = 1e-6 * max(reward_problem.total_cost(light), 0.0) + 1e-30
        return _Model(table, problem, options, unit_observations(problem, self.normalization, options), relaxation, quality,
                      min_bits, max_bits, low, high, option_bits, eps, reward_problem, reward_relaxation)

    # -- episode ----------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode. ``options``: ``"table"`` (index), ``"bpw"`` or ``"budget_bits"``."""
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - {"table", "bpw", "budget_bits"})
        if unknown:
            raise BitallocError(f"unknown reset option {unknown[0]!r} (table, bpw, budget_bits)")
        if "table" in options:
            index = int(options["table"])
            if not 0 <= index < len(self.models):
                raise BitallocError(f"table index {index} out of range (0..{len(self.models) - 1})")
        else:
            index = int(self.np_random.integers(len(self.models))) if len(self.models) > 1 else 0
        model = self.models[index]
        base = model.problem
        if "bpw" in options and "budget_bits" in options:
            raise BitallocError("give a bpw or a budget in bits, not both")
        if "bpw" in options or "budget_bits" in options:
            if "bpw" in options:
                budget = Budget.bpw(float(options["bpw"]))
                bits = budget.max_bits(base.total_numel)
            else:
                bits = int(options["budget_bits"])
                budget = Budget.bpw(bits / base.total_numel) if bits > 0 else Budget.bpw(0.0)  # 0: a one-line error
            if bits < model.min_bits:
                total = base.total_numel
                raise BitallocError(f"budget {budget} is infeasible for {model.table.key.model}: the feasible range is "
                                    f"{model.min_bits / total:.4f} to {model.max_bits / total:.4f} bpw")
        else:
            bits = int(self.np_random.integers(model.low_bits, model.high_bits + 1))
            budget = Budget.bpw(bits / base.total_numel)
        self._index, self._model = index, model
        self._problem = dataclasses.replace(base, budget=budget, budget_bits=bits)
        self._reward_problem = dataclasses.replace(model.reward_problem, budget=budget, budget_bits=bits)
        self._step = 0
        self._used = 0
        self._previous = 0.0
        self._paid = 0.0
        self._choice = np.full(base.num_units, -1, dtype=np.int64)
        self._unit_lp = model.reward_relaxation.unit_costs(bits) if self.reward_config.dense else None
        self._numel_left = np.concatenate([np.cumsum(base.numel[::-1])[::-1], [0]])
        self._min_left = np.concatenate([np.cumsum(model.option_bits[::-1, 0])[::-1], [0]])
        self._max_left = np.concatenate([np.cumsum(model.option_bits[::-1, 1])[::-1], [0]])
        info = {"table": index, "model": model.table.key.model, "budget_bits": bits, "target_bpw": bits / base.total_numel}
        return self._observation(), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        model, problem = self._model, self._problem
        if model is None or problem is None:
            raise RuntimeError("call reset() before step()")
        if self._step >= problem.num_units:
            raise RuntimeError("the episode is over; call reset()")
        value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        if np.isnan(value):
            raise ValueError("the action is NaN")
        value = min(max(value, 0.0), 1.0)
        unit = self._step
        choices = model.options[unit]
        if self.action_mapping == "price":
            paced = paced_price(model.relaxation, unit, problem.budget_bits - self._used)
            option = int(choices[price_choice(problem.cost[unit, choices], problem.weight[unit, choices].astype(np.float64), paced, value)])
        else:
            option = int(choices[action_to_index(value, len(choices))])
        self._choice[unit] = option
        self._used += int(problem.weight[unit, option])
        self._previous = value
        self._step += 1
        info: dict[str, Any] = {"unit": unit, "option": model.table.labels[option]}
        if self._step < problem.num_units:
            reward = 0.0
            if self._unit_lp is not None:
                scale = model.reward_relaxation.bound(problem.budget_bits) + model.eps
                assert self._reward_problem is not None
                reward = -(float(self._reward_problem.cost[unit, option]) - float(self._unit_lp[unit])) / scale
                self._paid += reward
            return self._observation(), reward, False, False, info
        return self._observation(), *self._finish(info)

    def _finish(self, info: dict[str, Any]) -> tuple[float, bool, bool, dict[str, Any]]:
        model, problem = self._model, self._problem
        assert model is not None and problem is not None
        raw = self._choice.copy()
        projected = downgrade(problem, raw) if self._used > problem.budget_bits else raw
        assert self._reward_problem is not None
        loss = model.quality.loss(self._reward_problem, projected)
        reference = model.quality.reference(self._reward_problem)
        reward = terminal_reward(loss, reference, model.eps, self._used, problem.budget_bits, self.reward_config) - self._paid
        bits = problem.total_bits(projected)
        info.update(
            table=self._index,
            model=model.table.key.model,
            quality=model.quality.name,
            raw_choice=raw,
            choice=projected,
            raw_bits=self._used,
            bits=bits,
            budget_bits=problem.budget_bits,
            bpw=bits / problem.total_numel,
            projected=bool((projected != raw).any()),
            loss=loss,
            reference_loss=reference,
        )
        return reward, True, False, info

    def _observation(self) -> np.ndarray:
        model, problem = self._model, self._problem
        assert model is not None and problem is not None
        t, count = self._step, problem.num_units
        static = model.static[t] if t < count else np.zeros(model.static.shape[1])
        budget = problem.budget_bits
        left = budget - self._used
        numel_left = int(self._numel_left[t])
        span_left = max(int(self._max_left[t] - self._min_left[t]), 1)
        state = [
            budget / problem.total_numel / BPW_SCALE,
            (budget - model.min_bits) / max(model.max_bits - model.min_bits, 1),
            self._used / budget,
            (count - t) / count,
            numel_left / problem.total_numel,
            left / numel_left / BPW_SCALE if numel_left else 0.0,
            (left - int(self._min_left[t])) / span_left,
            self._previous,
        ]
        assert len(state) == len(BUDGET_FEATURES)
        return np.clip(np.concatenate([static, state]), -OBS_CLIP, OBS_CLIP).astype(np.float32)

    # -- helpers ----------------------------------------------------------------------------

    @property
    def problem(self) -> Problem:
        """The current episode's problem (units, costs, bits and budget)."""
        if self._problem is None:
            raise RuntimeError("call reset() first")
        return self._problem

    def render(self) -> str | None:
        if self.render_mode != "ansi" or self._problem is None or self._model is None:
            return None
        labels = self._model.table.labels
        chosen = ", ".join(labels[o] for o in self._choice[: self._step])
        return (f"{self._model.table.key.model}: unit {self._step}/{self._problem.num_units}, "
                f"{self._used}/{self._problem.budget_bits} bits; {chosen}")

