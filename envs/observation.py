"""What :class:`envs.bitalloc_env.BitAllocEnv` observes at each step, and how it is normalized.

The full list of observation columns, their formulas and their scales is in ``envs/FEATURES.md``
(kept in step with :func:`observation_names`). In short, one observation is three parts:

1. the unit's layer features (:mod:`allocator.measure.features`, ``F`` columns), z-scored per column by a
   :class:`FeatureNormalization` fitted on the training tables (stored in the policy artifact and
   reused unchanged on a new model), clipped to +-``clip``; for a tie group the numel-weighted mean
   of its layers' normalized rows;
2. :data:`UNIT_FEATURES`: scale-free facts of the unit taken from the table itself (its size share,
   how sensitive it is relative to the other units, how fast its loss falls per bit, its bpw range);
3. :data:`BUDGET_FEATURES`: the budget state (target, spent, what is left) and the previous action.

Every column is clipped to +-:data:`OBS_CLIP`. Bump :data:`OBSERVATION_VERSION` whenever a column
or a scale changes: policy artifacts record it and refuse a mismatch.

The columns are the same for every table, but what part 2 reads differs: on a measured profile the units' losses
are measured sensitivities (:data:`OBSERVATION_VERSION`); on a features table (the features pass,
:mod:`allocator.measure.features_pass`) they are the cheap RTN-twin errors or a prior rule, nothing measured on
the model (:data:`FEATURES_OBSERVATION_VERSION`, RAMP's zero-shot setting). A policy trained on one kind observes
only that kind (:func:`observation_version`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from allocator.errors import BitallocError
from allocator.solvers.base import Problem
from allocator.table.sensitivity import SensitivityTable

OBSERVATION_VERSION = "bitalloc-obs-v1"
FEATURES_OBSERVATION_VERSION = "bitalloc-obs-features-v1"
OBSERVATION_VERSIONS = (OBSERVATION_VERSION, FEATURES_OBSERVATION_VERSION)
OBS_CLIP = 10.0
"""Bound of every observation column (the observation space is ``Box(-OBS_CLIP, OBS_CLIP)``)."""
BPW_SCALE = 8.0
"""Bits-per-weight quantities are divided by this (8 bpw, the widest usual option, maps to 1)."""
LOG_SCALE = 5.0
"""Log-share columns are divided by this (a unit 150x more sensitive than average maps to 1)."""
_EPS = 1e-30

UNIT_FEATURES: tuple[str, ...] = (
    "unit_log_param_share",
    "unit_log_loss_share",
    "unit_loss_decay",
    "unit_min_bpw",
    "unit_max_bpw",
)
BUDGET_FEATURES: tuple[str, ...] = (
    "target_bpw",
    "target_position",
    "budget_used",
    "units_left",
    "weights_left",
    "affordable_bpw",
    "remaining_position",
    "previous_action",
)


def observation_version(table: SensitivityTable) -> str:
    """The observation a policy builds from ``table``: features-only on a features table, else the table's."""
    return FEATURES_OBSERVATION_VERSION if table.features_only else OBSERVATION_VERSION


def observation_names(feature_names: Sequence[str]) -> list[str]:
    """Column names of an observation for a table with these layer features."""
    return [*(f"layer:{name}" for name in feature_names), *UNIT_FEATURES, *BUDGET_FEATURES]


@dataclass(frozen=True)
class FeatureNormalization:
    """Per-column affine normalization of the layer features: ``clip((f - mean) / std, +-clip)``.

    Fitted once on the training tables and stored with the policy, so a new model's features go
    through exactly the transform the policy was trained with. The layer features are already
    scale-free (ratios, shares, within-model normalized logs), so a fixed transform keeps them
    comparable across models; per-model z-scoring instead would erase what differs between models.
    """

    feature_schema: str
    feature_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    clip: float = 5.0

    @classmethod
    def fit(cls, tables: Sequence[SensitivityTable], clip: float = 5.0) -> FeatureNormalization:
        """Mean and standard deviation of every feature over all layers of ``tables`` (a constant
        column, like a one-hot never set, gets std 1)."""
        if not tables:
            raise BitallocError("fitting a feature normalization needs at least one table")
        first = tables[0]
        for table in tables[1:]:
            check_same_features(first, table)
        stacked = np.concatenate([np.nan_to_num(np.asarray(t.features, dtype=np.float64)) for t in tables])
        mean = stacked.mean(axis=0)
        std = stacked.std(axis=0)
        std = np.where(std > 1e-6, std, 1.0)
        return cls(first.feature_schema, tuple(first.feature_names), tuple(map(float, mean)), tuple(map(float, std)), float(clip))

    def check(self, table: SensitivityTable) -> None:
        """Raise a one-line :class:`BitallocError` unless ``table`` has this schema and these features."""
        if table.feature_schema != self.feature_schema:
            raise BitallocError(
                f"feature schema mismatch: the policy was trained on {self.feature_schema!r}, the table of "
                f"{table.key.model} has {table.feature_schema!r} (profile it again with this code)"
            )
        if tuple(table.feature_names) != self.feature_names:
            raise BitallocError(f"the table of {table.key.model} has features {table.feature_names}, the policy expects {list(self.feature_names)}")

    def apply(self, features: np.ndarray) -> np.ndarray:
        """Normalize an L x F feature matrix (NaN counts as the mean)."""
        raw = np.asarray(features, dtype=np.float64)
        z = (raw - np.asarray(self.mean)) / np.asarray(self.std)
        return np.clip(np.nan_to_num(z, nan=0.0, posinf=self.clip, neginf=-self.clip), -self.clip, self.clip)

    def as_dict(self) -> dict[str, Any]:
        return {
            "feature_schema": self.feature_schema,
            "feature_names": list(self.feature_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureNormalization:
        try:
            out = cls(
                str(data["feature_schema"]),
                tuple(str(n) for n in data["feature_names"]),
                tuple(float(v) for v in data["mean"]),
                tuple(float(v) for v in data["std"]),
                float(data.get("clip", 5.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"bad feature normalization: {exc}") from None
        if not len(out.feature_names) == len(out.mean) == len(out.std) or min(out.std, default=1.0) <= 0:
            raise BitallocError("bad feature normalization: names, means and positive stds must have one entry per feature")
        return out


def check_same_features(first: SensitivityTable, other: SensitivityTable) -> None:
    """Tables trained on together must describe their layers with the same features."""
    if other.feature_schema != first.feature_schema or list(other.feature_names) != list(first.feature_names):
        raise BitallocError(
            f"tables of {first.key.model} ({first.feature_schema!r}) and {other.key.model} "
            f"({other.feature_schema!r}) have different features; profile them with the same code"
        )


def unit_observations(problem: Problem, normalization: FeatureNormalization, options: Sequence[np.ndarray]) -> np.ndarray:
    """The budget-independent part of every unit's observation: U x (F + len(UNIT_FEATURES)).

    ``options`` holds per unit the option indices its actions map to, lightest first.
    """
    table = problem.table
    if missing := [name for j, name in enumerate(table.feature_names) if np.isnan(np.asarray(table.features[:, j], dtype=np.float64)).all()]:
        raise BitallocError(f"the table of {table.key.model} lacks {', '.join(missing)} (made without activation statistics); "
                            "a policy observes every feature")
    normalized = normalization.apply(table.features)
    count = problem.num_units
    rows = np.zeros((count, normalized.shape[1] + len(UNIT_FEATURES)), dtype=np.float64)
    light_cost = np.array([problem.cost[u, opts[0]] for u, opts in enumerate(options)])
    mean_light = float(np.mean(light_cost))
    for u, (members, opts) in enumerate(zip(problem.units, options)):
        share = table.numel[members] / table.numel[members].sum()
        rows[u, : normalized.shape[1]] = share @ normalized[members]
        bpw = problem.weight[u, opts] / problem.numel[u]
        cost = problem.cost[u, opts]
        span = float(bpw[-1] - bpw[0])
        decay = math.log(max(cost[0], _EPS) / max(cost[-1], _EPS)) / span / (2 * math.log(2)) if span > 0 else 0.0
        rows[u, normalized.shape[1] :] = [
            math.log(count * problem.numel[u] / problem.total_numel) / LOG_SCALE,
            math.log(max(cost[0], _EPS) / max(mean_light, _EPS)) / LOG_SCALE,
            decay,  # 1 for the a * 2^(-2 bpw) loss model of BAQ
            bpw[0] / BPW_SCALE,
            bpw[-1] / BPW_SCALE,
        ]
    return np.clip(rows, -OBS_CLIP, OBS_CLIP)
