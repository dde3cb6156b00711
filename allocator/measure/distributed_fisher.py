"""The Fisher pass on a Ray cluster (``--ray`` with ``--fisher``): its chunks of windows are independent units.

Every worker (one CPU each) holds a copy of the model and runs :func:`allocator.measure.fisher_gradients.chunk_sums`
on the chunks it is sent; the driver takes the chunks' sums back in the order it sent them and adds them as the
serial pass does, so checkpoints and resuming work as in :func:`allocator.measure.fisher.fisher_diagonals` and the
diagonals are the serial ones wherever a worker's gradients are (bit for bit on small shapes; on a real model a
one-thread worker's products round differently from a multi-threaded driver's, as the KL's do:
:mod:`allocator.measure.distributed_kl`).

Memory: each worker holds the model in its stored dtype and two sets of float32 sums (its chunk's and the one
being sent); the driver holds at most ``2 x workers`` chunks' sums in flight. A cluster of N workers on one machine
needs N model copies beside the driver's; ``--ray-cpus`` bounds N on a local cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

import torch
from transformers import PreTrainedModel

from allocator.measure.distributed import RayActors, RaySettings
from allocator.measure.fisher_gradients import Sums, chunk_sums

log = logging.getLogger(__name__)

Chunk = tuple[int, torch.Tensor]
"""A unit: the index of its first window in the pass, and its windows (rows of token ids)."""


class _FisherWorker:
    """A Ray actor: the model, running chunks one at a time on one thread."""

    def __init__(self, model: PreTrainedModel, variants: Sequence[str], seed: int) -> None:
        torch.set_num_threads(1)  # one CPU per worker, as the actor asked of Ray
        self.model, self.variants, self.seed = model, list(variants), seed

    def chunk(self, unit: Chunk) -> tuple[int, Sums, int]:
        start, windows = unit
        sums, tokens = chunk_sums(self.model, windows, start, self.variants, self.seed)
        return start, sums, tokens


class RayFisherPass(RayActors):
    """Chunks of a Fisher pass on Ray (see the module doc). Use as a context manager, or :meth:`close` it."""

    def __init__(self, model: PreTrainedModel, variants: Sequence[str], seed: int, settings: RaySettings) -> None:
        super().__init__(_FisherWorker, settings, model, list(variants), seed)
        log.info("running the Fisher pass on Ray: %d workers, each with a copy of the model", self.workers)

    def run(self, chunks: Iterable[Chunk]) -> Iterator[tuple[int, Sums, int]]:
        """Each chunk's first window, sums and predicted positions, in the order the chunks came."""
        return self.in_order(lambda worker, unit: worker.chunk.remote(unit), chunks)


__all__ = ["Chunk", "RayFisherPass"]
