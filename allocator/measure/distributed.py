"""The profile's independent units on a Ray cluster (``pip install 'bitalloc[distributed]'``, ``--ray``).

The process that profiles (the driver) keeps the model: it runs the decoder blocks, accumulates each layer's
input Hessian and measures its features, as without Ray. Each layer's weight and Hessian then go into Ray's object
store once, and every group of options that shares its work (:func:`allocator.measure.option_scores.option_groups`:
the GPTQ options of one column loop, or one other quantizer) becomes one task on one worker CPU. The driver goes
on with the next block while the workers quantize, and finishes a layer (its KL probe, kept weights and partial
save) when its last unit returns, oldest layer first, so an interrupted run resumes as a serial one does.

A unit is the pure function :func:`allocator.measure.option_scores.score_options` of (weight, Hessian,
quantizers), and GPTQ runs single-threaded wherever it runs, so the table is the one the serial run writes.

Where the cluster is (:class:`RaySettings`): ``auto`` joins the cluster named by ``RAY_ADDRESS`` or one started on
this machine with ``ray start``, else starts a local one with every CPU here; ``local`` always starts a local one;
anything else is a cluster address (``HOST:6379``, or ``ray://HOST:10001`` through Ray Client). Every node needs
the same bitalloc and torch installed.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import torch

from allocator.errors import BitallocError
from allocator.measure.option_scores import OptionScore, option_groups, score_options
from quantizers import Quantizer

log = logging.getLogger(__name__)

RAY_EXTRA = "bitalloc[distributed]"
RAY_ADDRESS_HELP = ("profile (and measure the single-layer KL and the Fisher) on Ray: 'auto' (the cluster in RAY_ADDRESS or one started here "
                    "with `ray start`, else a new local one), 'local' (a new local one), or a cluster address (HOST:6379, ray://HOST:10001)")


def require_ray() -> ModuleType:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BitallocError(f"--ray needs Ray: pip install '{RAY_EXTRA}'") from None
    return ray


@dataclass(frozen=True)
class RaySettings:
    """Which Ray cluster the profile's units run on (see the module doc)."""

    address: str = "auto"
    num_cpus: int | None = None
    """CPUs of a local cluster this starts (default: every CPU of this machine); not used when joining one."""
    object_store_bytes: int | None = None
    """Object store size of a local cluster this starts (default: Ray's)."""

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise BitallocError("--ray needs 'auto', 'local' or a cluster address")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise BitallocError(f"a local Ray cluster needs at least one CPU, got {self.num_cpus}")

    def check_reachable(self, seconds: float = 5.0) -> None:
        """Fail in one line when a cluster address takes no connection (Ray itself retries for minutes)."""
        if self.address in ("auto", "local"):
            return
        host, _, port = self.address.removeprefix("ray://").rpartition(":")
        if not host or not port.isdigit():
            raise BitallocError(f"--ray: {self.address!r} is not 'auto', 'local', HOST:PORT or ray://HOST:PORT")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
        except OSError as exc:
            raise BitallocError(f"cannot reach the Ray cluster at {self.address}: {exc.strerror or exc}") from None

    def connect(self, ray: ModuleType) -> bool:
        """Join or start the cluster; True when this call did (so the caller shuts it down after)."""
        self.check_reachable()
        if ray.is_initialized():
            return False
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": False}
        if self.address == "local":
            options |= {"address": "local", "num_cpus": self.num_cpus, "object_store_memory": self.object_store_bytes}
        elif self.address != "auto":
            options["address"] = self.address
        elif self.num_cpus is not None or self.object_store_bytes is not None:
            options |= {"num_cpus": self.num_cpus, "object_store_memory": self.object_store_bytes}
        try:
            ray.init(**options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise BitallocError(f"cannot reach the Ray cluster {self.address!r}: {str(exc).splitlines()[0]}") from None
        return True


_Actors = TypeVar("_Actors", bound="RayActors")


class RayActors:
    """One actor per CPU of a Ray cluster, each built from the same arguments (put into the object store once), and
    units sent to them with the results in the order the units came. Joins or starts the cluster; :meth:`close`
    (or leaving its ``with``) stops the actors, and the cluster if this started or joined it."""

    def __init__(self, actor_class: type, settings: RaySettings, *arguments: Any) -> None:
        self._ray = ray = require_ray()
        self._started = settings.connect(ray)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        references = [ray.put(argument) for argument in arguments]
        actor = ray.remote(num_cpus=1)(actor_class)
        self._actors = [actor.remote(*references) for _ in range(self.workers)]
        self.max_in_flight = 2 * self.workers
        """Units sent and not yet returned: bounds what waits in the object store."""

    def in_order(self, call: Callable[[Any, Any], Any], units: Iterable[Any]) -> Iterator[Any]:
        """``call(actor, unit)`` (an actor method's remote call) for every unit, the results in the order the units
        came; a unit waits while :attr:`max_in_flight` are out."""
        from ray.util import ActorPool

        pool = ActorPool(self._actors)
        waiting = 0
        for unit in units:
            if waiting >= self.max_in_flight:
                yield pool.get_next()
                waiting -= 1
            pool.submit(call, unit)
            waiting += 1
        while waiting:
            yield pool.get_next()
            waiting -= 1

    def close(self) -> None:
        for worker in self._actors:
            self._ray.kill(worker)
        self._actors = []
        if self._started:
            self._ray.shutdown()

    def __enter__(self: _Actors) -> _Actors:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _score_unit(quantizers: Sequence[Quantizer], weight: torch.Tensor, hessian: torch.Tensor) -> tuple[list[OptionScore], float]:
    """One unit on a worker: its options' scores and the seconds they took."""
    start = time.perf_counter()
    return score_options(quantizers, weight, hessian), time.perf_counter() - start


@dataclass
class _PendingLayer:
    payload: Any
    units: list[Any]


class RayLayerScorer:
    """Scores layers on Ray: :meth:`submit` a layer, :meth:`collect` the finished ones (oldest first).

    At most ``max_in_flight`` units wait or run at once (default twice the cluster's CPUs): a submit past that
    first waits for the oldest layer, so the object store holds a bounded number of layers.
    """

    def __init__(self, quantizers: Sequence[Quantizer], settings: RaySettings, max_in_flight: int | None = None) -> None:
        self._ray = ray = require_ray()
        self._started = settings.connect(ray)
        self._groups = option_groups(quantizers)
        self._options = len(quantizers)
        self._quantizers = [ray.put([quantizers[i] for i in group]) for group in self._groups]
        self._unit = ray.remote(_score_unit).options(num_cpus=1)
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.max_in_flight = max_in_flight or 2 * workers
        self._pending: dict[str, _PendingLayer] = {}
        log.info("profiling on Ray: %d worker CPUs, %d units per layer", workers, len(self._groups))

    def submit(self, name: str, weight: torch.Tensor, hessian: torch.Tensor, payload: Any = None) -> list[tuple[str, Any, list[OptionScore], float]]:
        """Queue layer ``name`` (``payload`` comes back with its scores); returns the layers that had to finish first."""
        finished = self.collect(wait_for=max(0, self.in_flight + len(self._groups) - self.max_in_flight))
        weight_ref, hessian_ref = self._ray.put(weight), self._ray.put(hessian)
        units = [self._unit.remote(quantizers, weight_ref, hessian_ref) for quantizers in self._quantizers]
        self._pending[name] = _PendingLayer(payload, units)
        return finished

    @property
    def in_flight(self) -> int:
        return sum(len(layer.units) for layer in self._pending.values())

    def collect(self, wait_for: int = 0, everything: bool = False) -> list[tuple[str, Any, list[OptionScore], float]]:
        """The pending layers whose units are done, oldest first, as (name, payload, scores in option order, worker
        seconds); waits until at least ``wait_for`` units have been collected (``everything``: all of them)."""
        finished = []
        collected = 0
        while self._pending:
            name, layer = next(iter(self._pending.items()))
            must_wait = everything or collected < wait_for
            ready, _ = self._ray.wait(layer.units, num_returns=len(layer.units), timeout=None if must_wait else 0)
            if len(ready) < len(layer.units):
                break
            scores: list[OptionScore | None] = [None] * self._options
            seconds = 0.0
            for group, (group_scores, unit_seconds) in zip(self._groups, self._ray.get(layer.units)):
                for index, score in zip(group, group_scores):
                    scores[index] = score
                seconds += unit_seconds
            collected += len(layer.units)
            del self._pending[name]
            finished.append((name, layer.payload, [s for s in scores if s is not None], seconds))
        return finished

    def close(self) -> None:
        """Drop what is still pending, and shut down the cluster if this scorer started or joined it."""
        for layer in self._pending.values():
            for unit in layer.units:
                self._ray.cancel(unit)
        self._pending.clear()
        if self._started:
            self._ray.shutdown()


__all__ = ["RAY_ADDRESS_HELP", "RAY_EXTRA", "RayActors", "RayLayerScorer", "RaySettings", "require_ray"]
