"""The single-layer KL measurement on a Ray cluster (``--ray``): its (layer, options) rows are independent units.

Every worker (one CPU each) holds a copy of the model and its own :class:`allocator.measure.profile.KLProbe` on the
same windows; the driver decodes one layer's kept option weights, sends them as one unit, and takes the rows back in
the order it sent them, so the checkpointing and resuming of :func:`allocator.measure.layer_kl.measure_kept_kl` work as
in the serial run. The probe sums each KL on one thread; the forward itself still runs on the worker's one thread,
which on a real model rounds differently from a multi-threaded driver (results/distributed.md: SmolLM2's KLs differ
from the serial ones), so the values agree with the serial run's to float rounding, bit for bit only on small shapes.

Memory: each worker holds the model in the dtype it is stored in, so a cluster of N workers on one machine needs N
model copies beside the driver's; ``--ray-cpus`` bounds N on a local cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from allocator.measure.distributed import RayActors, RaySettings
from allocator.measure.profile import KLProbe

log = logging.getLogger(__name__)

Row = tuple[Any, Sequence[Mapping[str, torch.Tensor]]]
"""A unit: a key the caller gets back, and the overlays (module name -> weight) whose KLs it wants."""


class _KLWorker:
    """A Ray actor: the model and a probe on the windows, measuring units one at a time on one thread."""

    def __init__(self, model: PreTrainedModel, windows: torch.Tensor) -> None:
        torch.set_num_threads(1)  # one CPU per worker, as the actor asked of Ray
        self.probe = KLProbe(model, windows)

    def measure(self, row: Row) -> tuple[Any, list[float]]:
        key, overlays = row
        return key, [self.probe.mean_kl(overlay) for overlay in overlays]


class RayKLProbe(RayActors):
    """KLs of many rows on Ray (see the module doc). Use as a context manager, or :meth:`close` it."""

    def __init__(self, model: PreTrainedModel, windows: torch.Tensor, settings: RaySettings) -> None:
        super().__init__(_KLWorker, settings, model, windows)
        log.info("measuring the single-layer KL on Ray: %d workers, each with a copy of the model", self.workers)

    def measure_rows(self, rows: Iterable[Row]) -> Iterator[tuple[Any, list[float]]]:
        """Each row's key and its overlays' KLs, in the order the rows came (a row waits for a free worker)."""
        return self.in_order(lambda worker, unit: worker.measure.remote(unit), rows)


__all__ = ["RayKLProbe", "Row"]
