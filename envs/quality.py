"""Quality backends of :class:`envs.bitalloc_env.BitAllocEnv`: how good a finished allocation is.

A backend scores one model's allocations (lower is better) and gives the reference loss the reward
divides by (:mod:`envs.reward`):

- :class:`TableQuality` (``"table"``, fast, for training): the sum of the sensitivity table's
  loss over the chosen options; reference: the LP-relaxation optimum at the budget.
- :class:`KLQuality` (``"kl"``, slow, for validation and fine-tuning): the measured mean per-token
  KL(reference || model) on calibration windows, with the profile's kept per-(layer, option)
  weights (:class:`allocator.measure.option_weights.OptionWeights`) swapped into the reference model;
  reference: the measured KL of a solver's allocation at the same budget (cached per budget).
  One forward pass over the windows per episode.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from allocator.errors import BitallocError
from allocator.solvers import greedy
from allocator.solvers.base import Problem
from allocator.table.sensitivity import SensitivityTable
from envs.reward import LPRelaxation

if TYPE_CHECKING:  # the KL backend's imports pull in transformers; the table backend needs none of it
    from allocator.measure.option_weights import OptionWeights
    from allocator.measure.profile import KLProbe
    from allocator.model.corpus import Corpus
    from allocator.model.loading import LoadedModel


class QualityBackend(Protocol):
    """Scores the allocations of one table's units (``choice``: an option index per unit)."""

    name: str

    def loss(self, problem: Problem, choice: np.ndarray) -> float:
        """The loss of ``choice`` (lower is better)."""
        ...

    def reference(self, problem: Problem) -> float:
        """The loss the reward compares with at ``problem.budget_bits``."""
        ...


class TableQuality:
    """Predicted loss from the sensitivity table; reference: the LP-relaxation optimum."""

    name = "table"

    def __init__(self, relaxation: LPRelaxation) -> None:
        self.relaxation = relaxation

    def loss(self, problem: Problem, choice: np.ndarray) -> float:
        return problem.total_cost(choice)

    def reference(self, problem: Problem) -> float:
        return self.relaxation.bound(problem.budget_bits)


def layer_labels(problem: Problem, choice: np.ndarray) -> dict[str, str]:
    """Module name -> option label of a unit choice."""
    table = problem.table
    return {table.names[i]: table.labels[int(choice[u])] for u, members in enumerate(problem.units) for i in members}


class KLQuality:
    """Measured KL with the kept option weights swapped in; reference: the greedy solver's
    allocation at the same budget, measured the same way."""

    name = "kl"

    def __init__(self, probe: KLProbe, weights: OptionWeights) -> None:
        self.probe = probe
        self.weights = weights
        self._reference: dict[int, float] = {}  # budget bits -> measured KL of the solver's allocation

    @classmethod
    def from_model(
        cls,
        table: SensitivityTable,
        loaded: LoadedModel,
        corpus: Corpus,
        windows: int = 2,
        seqlen: int | None = None,
        table_path: Path | None = None,
    ) -> KLQuality:
        """The backend for ``table`` of ``loaded``: ``windows`` calibration windows of ``seqlen``
        tokens (default: the profile's) drawn as the profile drew them, and the weights kept beside
        the table (at ``table_path``, default: its place in the profile cache)."""
        from allocator.measure.option_weights import OptionWeights
        from allocator.measure.profile import KLProbe, cached_table_path
        from allocator.model.tokens import calibration_samples

        if table.key.model != loaded.name:
            raise BitallocError(f"the table was profiled on {table.key.model}, not on {loaded.name}")
        weights = OptionWeights.beside(table_path or cached_table_path(table), table.labels)
        missing = weights.missing(table.names)
        if missing:
            raise BitallocError(f"the KL backend needs the kept weights of every layer; {len(missing)} missing in {weights.directory}")
        tokens = calibration_samples(loaded.tokenizer, corpus.calibration, windows, seqlen or table.key.seqlen, loaded.add_bos, table.key.seed)
        return cls(KLProbe(loaded.model, tokens), weights)

    def loss(self, problem: Problem, choice: np.ndarray) -> float:
        return self.probe.mean_kl(self.weights.assemble(layer_labels(problem, choice)))

    def reference(self, problem: Problem) -> float:
        if problem.budget_bits not in self._reference:
            choice, _ = greedy.choose(problem)
            self._reference[problem.budget_bits] = self.loss(problem, choice)
        return self._reference[problem.budget_bits]
