"""Losses known without measuring anything: rules a user applies when nothing about the model is measured.

Each is BAQ's loss model ``w_layer * numel * 2^(-2 bpw)`` (the mean squared rounding error of a uniform quantizer
falls 4x per added bit) with a per-layer weight ``w`` that encodes one rule of thumb; the ILP on it is the rule
carried out exactly at the budget. They read only the table's bits, sizes and structural features
(``relative_depth``, ``kind_*``), never a measured loss, so they serve as the baselines a features-only policy
has to beat (``benchmarks/results/policy_zeroshot.md``):

- ``ends_first``: the first and the last decoder block weigh :data:`ENDS_WEIGHT` times the others (ExLlamaV3
  and llama.cpp's presets give the first and last layers more bits without measuring them);
- ``module_kind``: value and down projections weigh :data:`KIND_WEIGHT` times the others (llama.cpp's ``_M``
  presets raise ``attn_v`` and ``ffn_down``);
- ``flat``: every weight counts the same (the ILP then spends bits evenly, as uniform quantization does,
  but uses the whole budget).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from allocator.errors import BitallocError
from allocator.table.sensitivity import NOT_APPLICABLE, SensitivityTable

ENDS_WEIGHT = 4.0
KIND_WEIGHT = 4.0
HEAVY_KINDS = ("kind_v", "kind_down")


def _feature(table: SensitivityTable, name: str) -> np.ndarray:
    if name not in table.feature_names:
        raise BitallocError(f"the table of {table.key.model} has no feature {name!r}, which the prior losses read")
    return np.asarray(table.features[:, table.feature_names.index(name)], dtype=np.float64)


def _end_blocks(table: SensitivityTable) -> np.ndarray:
    depth = _feature(table, "relative_depth")
    return (depth <= depth.min() + 1e-9) | (depth >= depth.max() - 1e-9)


def _heavy_kinds(table: SensitivityTable) -> np.ndarray:
    return np.any([_feature(table, name) > 0.5 for name in HEAVY_KINDS], axis=0)


def prior_loss(table: SensitivityTable, layer_weight: np.ndarray) -> np.ndarray:
    """``layer_weight[l] * numel[l] * 2^(-2 bpw[l, o])``, NaN where an option does not apply."""
    bpw = table.bits / table.numel[:, None].astype(np.float64)
    loss = layer_weight[:, None] * table.numel[:, None] * np.exp2(-2.0 * bpw)
    loss[table.bits == NOT_APPLICABLE] = np.nan
    return loss


PRIOR_LOSSES: dict[str, Callable[[SensitivityTable], np.ndarray]] = {
    "flat": lambda table: np.ones(table.num_layers),
    "ends_first": lambda table: np.where(_end_blocks(table), ENDS_WEIGHT, 1.0),
    "module_kind": lambda table: np.where(_heavy_kinds(table), KIND_WEIGHT, 1.0),
}
"""Loss name -> per-layer weight of the rule (module doc)."""


def prior_losses(table: SensitivityTable) -> dict[str, np.ndarray]:
    """Every rule's L x O loss matrix for ``table``."""
    return {name: prior_loss(table, weight(table)) for name, weight in PRIOR_LOSSES.items()}


__all__ = ["ENDS_WEIGHT", "KIND_WEIGHT", "PRIOR_LOSSES", "prior_loss", "prior_losses"]
