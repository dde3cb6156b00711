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

from allocator.measure.distributed import RaySettings, in_order_on_actors, require_ray
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


class RayKLProbe:
    """KLs of many rows on Ray (see the module doc). Use as a context manager, or :meth:`close` it."""

    def __init__(self, model: PreTrainedModel, windows: torch.Tensor, settings: RaySettings) -> None:
        self._ray = ray = require_ray()
        self._started = settings.connect(ray)
        count = max(1, int(ray.cluster_resources().get("CPU", 1)))
        model_ref, windows_ref = ray.put(model), ray.put(windows)
        actor = ray.remote(num_cpus=1)(_KLWorker)
        self._actors = [actor.remote(model_ref, windows_ref) for _ in range(count)]
        self.max_in_flight = 2 * count
        """Rows sent and not yet returned: bounds the decoded weights waiting in the object store."""
        log.info("measuring the single-layer KL on Ray: %d workers, each with a copy of the model", count)

    def measure_rows(self, rows: Iterable[Row]) -> Iterator[tuple[Any, list[float]]]:
        """Each row's key and its overlays' KLs, in the order the rows came (a row waits for a free worker)."""
        return in_order_on_actors(self._actors, lambda worker, unit: worker.measure.remote(unit), rows, self.max_in_flight)

    def close(self) -> None:
        """Stop the workers, and the cluster if this started or joined it."""
        for worker in self._actors:
            self._ray.kill(worker)
        self._actors = []
        if self._started:
            self._ray.shutdown()

    def __enter__(self) -> RayKLProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["RayKLProbe", "Row"]
