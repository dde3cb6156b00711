"""Measured single-layer KL from a profile's kept weights, and the KL-calibrated loss built on it.

The profile's default loss, the Hessian-weighted output error ``tr((W-Q) H (W-Q)^T)``, measures the
damage at a layer's own output, in that layer's units. How much of it reaches the model's output
differs by orders of magnitude between layers (a v_proj with small outputs feeds every later
token; a down_proj error is added to a large residual stream), so summing it over layers ranks
allocations poorly once layers of very different kinds trade bits (benchmarks/results/allocation.md).

The fix measured here: the KL(reference || model) on a few calibration tokens with only one layer
quantized (one forward per (layer, option), from the kept weights, so no re-quantization), either

- for every option (``kl``: the issue's "measured KL increase when only that layer is quantized"), or
- for a few anchor options only, then ``kl_est = g_l * hessian_err`` with one gain ``g_l`` per layer,
  the geometric mean of ``kl / hessian_err`` over that layer's anchors: the second-order view
  (KL ~ e^T F e for an output error e) with the layer's Fisher gain fitted instead of assumed 1.

Both are added to the table as losses the solvers can take (``--loss kl`` / ``--loss kl_est``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from allocator.errors import BitallocError
from allocator.measure.distributed import RaySettings
from allocator.measure.distributed_kl import RayKLProbe, Row
from allocator.measure.option_weights import OptionWeights
from allocator.measure.profile import KLProbe
from allocator.model.loading import LoadedModel
from allocator.model.placement import CPU
from allocator.model.tokens import calibration_samples
from allocator.storage import atomic_path
from allocator.table.losses import HESSIAN_ERR, KL_CALIBRATED, KL_LOCAL, KL_MEASURED
from allocator.table.sensitivity import SensitivityTable

log = logging.getLogger(__name__)

DEFAULT_KL_SEQLEN = 256
"""Tokens per KL window (the measurement costs one forward over them per (layer, option))."""
KL_ESTIMATE_ANCHORS = "kl_est_anchors"
"""Metadata key: the options ``kl_est`` is calibrated on (a measurement of every option may serve fewer anchors)."""
CHECKPOINT_EVERY = 8
"""Layers between saves of the partial measurement (an interrupted run resumes from it)."""


def measure_kept_kl(
    probe: KLProbe | RayKLProbe,
    weights: OptionWeights,
    names: Sequence[str],
    labels: Sequence[str],
    measure: np.ndarray,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """KL of every (layer, option) where ``measure`` (L x O bool) is set, NaN elsewhere.

    Each value is ``probe.mean_kl`` with that one kept weight swapped into the reference; a :class:`RayKLProbe`
    measures the layers' rows on its workers (the same values up to float rounding). With ``checkpoint`` the matrix is saved there every
    few layers and reloaded on a rerun.
    """
    if measure.shape != (len(names), len(labels)):
        raise BitallocError(f"measure mask has shape {measure.shape}, expected {(len(names), len(labels))}")
    missing = weights.missing(list(names))
    if missing:
        raise BitallocError(f"{len(missing)} layers have no kept weights (first: {missing[0]}); profile with weights kept")
    result = np.full(measure.shape, np.nan)
    if checkpoint is not None and checkpoint.is_file():
        try:
            saved = np.load(checkpoint, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # a damaged resume point is only lost work
            log.warning("ignoring the KL checkpoint %s: %s", checkpoint, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            saved = np.empty(0)
        if saved.shape == result.shape and saved.dtype.kind == "f":
            result = saved
            log.info("resuming the KL measurement from %s", checkpoint)
    todo = [i for i in range(len(names)) if np.any(measure[i] & np.isnan(result[i]))]

    def rows() -> Iterator[Row]:
        for i in todo:
            columns = np.flatnonzero(measure[i] & np.isnan(result[i]))
            yield (i, columns), [{names[i]: weights.load(names[i], labels[j])} for j in columns]

    if isinstance(probe, RayKLProbe):
        measured = probe.measure_rows(rows())
    else:
        measured = ((key, [probe.mean_kl(overlay) for overlay in overlays]) for key, overlays in rows())
    for count, ((i, columns), values) in enumerate(tqdm(measured, total=len(todo), desc="layer KL", disable=not progress), start=1):
        result[i, columns] = values
        if checkpoint is not None and (count % CHECKPOINT_EVERY == 0 or count == len(todo)):
            with atomic_path(checkpoint) as tmp, open(tmp, "wb") as handle:  # np.save appends .npy to bare paths
                np.save(handle, result)
    return result


def layer_gains(hessian_err: np.ndarray, kl: np.ndarray) -> np.ndarray:
    """Per layer, the geometric mean of ``kl / hessian_err`` over the options measured for it."""
    usable = np.isfinite(kl) & np.isfinite(hessian_err) & (kl > 0) & (hessian_err > 0)
    if not usable.any(axis=1).all():
        row = int(np.flatnonzero(~usable.any(axis=1))[0])
        raise BitallocError(f"layer {row} has no option with a positive measured KL and Hessian error to calibrate on")
    logs = np.where(usable, np.log(np.where(usable, kl, 1.0)) - np.log(np.where(usable, hessian_err, 1.0)), 0.0)
    return np.exp(logs.sum(axis=1) / usable.sum(axis=1))


def calibrated_kl(hessian_err: np.ndarray, kl: np.ndarray) -> np.ndarray:
    """``kl_est[l, o] = g_l * hessian_err[l, o]`` (see the module doc); NaN stays NaN."""
    return layer_gains(hessian_err, kl)[:, None] * hessian_err


def anchor_mask(table: SensitivityTable, anchors: Sequence[str] | None) -> np.ndarray:
    """L x O mask of the (layer, option) pairs to measure: ``anchors`` (labels) or every option."""
    available = table.bits >= 0
    if anchors is None:
        return available
    unknown = [a for a in anchors if a not in table.labels]
    if unknown:
        raise BitallocError(f"option {unknown[0]!r} is not in this profile ({', '.join(table.labels)})")
    columns = np.isin(np.array(table.labels), list(anchors))
    return available & columns[None, :]


def with_kl_losses(table: SensitivityTable, kl: np.ndarray, settings: dict, calibrate_on: np.ndarray | None = None) -> SensitivityTable:
    """A copy of ``table`` with ``kl`` (measured, NaN where not) and ``kl_est`` added as losses;
    ``settings`` (windows, seqlen, anchors, and optionally the measurement's seconds) go to its metadata.

    ``kl_est`` is calibrated on the (layer, option) pairs set in ``calibrate_on`` (default: every measured one), so
    a table measured on every option still gives the estimate its anchors alone would give."""
    basis = kl if calibrate_on is None else np.where(calibrate_on, kl, np.nan)
    losses = {**table.losses, KL_MEASURED: kl, KL_CALIBRATED: calibrated_kl(table.loss(HESSIAN_ERR), basis)}
    descriptions = dict(table.metadata.get("losses", {}))
    descriptions[KL_MEASURED] = (f"mean per-token KL(reference || model), only this layer quantized (kept weight), on "
                                 f"{settings['windows']} x {settings['seqlen']} calibration tokens; NaN where not measured")
    descriptions[KL_CALIBRATED] = "g_l * hessian_err, g_l = geometric mean of kl / hessian_err over the layer's anchor options"
    anchors = settings["anchors"] if calibrate_on is None else calibrated_labels(table, calibrate_on)
    metadata = {**table.metadata, "kl_measurement": settings, KL_ESTIMATE_ANCHORS: anchors, "losses": descriptions}
    return dataclasses.replace(table, losses=losses, metadata=metadata)


def calibrated_labels(table: SensitivityTable, calibrate_on: np.ndarray) -> list[str] | str:
    """The option labels a calibration mask covers, or "all" where it covers every available option."""
    if np.array_equal(calibrate_on, table.bits >= 0):
        return "all"
    return sorted(label for label, used in zip(table.labels, calibrate_on.any(axis=0)) if used)


def _covers(done: dict | None, wanted: dict) -> bool:
    """Whether a measurement made with ``done`` settings holds everything ``wanted`` asks for."""
    if not done or (done.get("windows"), done.get("seqlen")) != (wanted["windows"], wanted["seqlen"]):
        return False
    return done.get("anchors") == "all" or (wanted["anchors"] != "all" and set(wanted["anchors"]) <= set(done.get("anchors", [])))


def _kl_seqlen(table: SensitivityTable, windows: int, seqlen: int | None) -> int:
    """The KL window length (default :data:`DEFAULT_KL_SEQLEN` or the profile's, if shorter), checked
    against the profile's calibration draw."""
    key = table.key
    seqlen = min(DEFAULT_KL_SEQLEN, key.seqlen) if seqlen is None else seqlen
    if not 1 <= windows <= key.samples or not 2 <= seqlen <= key.seqlen:
        raise BitallocError(f"the KL is measured on 1 to {key.samples} windows of 2 to {key.seqlen} tokens, got {windows} x {seqlen}")
    return seqlen


def _kl_windows(loaded: LoadedModel, table: SensitivityTable, calibration_text: str, windows: int, seqlen: int) -> torch.Tensor:
    """The first ``windows`` windows of the table's own calibration draw, cut to ``seqlen`` tokens."""
    key = table.key
    tokens = calibration_samples(loaded.tokenizer, calibration_text, key.samples, key.seqlen, loaded.add_bos, key.seed)
    return tokens[:windows, :seqlen]


def add_kl_losses(
    loaded: LoadedModel,
    table: SensitivityTable,
    table_path: Path,
    calibration_text: str,
    anchors: Sequence[str] | None = None,
    windows: int = 1,
    seqlen: int | None = None,
    progress: bool = True,
    device: torch.device = CPU,
    ray: RaySettings | None = None,
) -> SensitivityTable:
    """Measure the single-layer KL (of ``anchors``, or every option) from the weights kept beside
    ``table_path``, on the first ``windows`` calibration windows of the table's own calibration
    draw cut to ``seqlen`` tokens (default :data:`DEFAULT_KL_SEQLEN` or the profile's, if shorter), and
    rewrite the table there with ``kl`` and ``kl_est`` added.

    Interrupted measurements resume from ``<table>.kl-<settings>.npy`` (the recorded seconds are then
    those of the last session); a table that already holds losses measured on the same windows for
    these options (or all) is not measured again, only its ``kl_est`` re-calibrated on these anchors. The probe's blocks
    run on ``device``; with ``ray`` the layers are measured on that cluster's CPU workers
    (:mod:`allocator.measure.distributed_kl`: the same values up to float rounding).
    """
    seqlen = _kl_seqlen(table, windows, seqlen)
    measure = anchor_mask(table, anchors)
    settings = {"windows": windows, "seqlen": seqlen, "anchors": sorted(anchors) if anchors else "all"}
    done = table.metadata.get("kl_measurement")
    if _covers(done, settings) and KL_CALIBRATED in table.losses:
        if table.metadata.get(KL_ESTIMATE_ANCHORS, done["anchors"]) == settings["anchors"]:
            return table
        result = with_kl_losses(table, table.loss(KL_MEASURED), done, calibrate_on=measure)  # re-calibrated, not re-measured
        result.save(Path(table_path))
        return result
    weights = OptionWeights.beside(table_path, table.labels)
    tokens = _kl_windows(loaded, table, calibration_text, windows, seqlen)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    checkpoint = Path(table_path).with_suffix(f".kl-{digest}.npy")
    start = time.perf_counter()
    probe = RayKLProbe(loaded.model, tokens, ray) if ray is not None else contextlib.nullcontext(KLProbe(loaded.model, tokens, device=device))
    with probe as measuring:
        kl = measure_kept_kl(measuring, weights, table.names, table.labels, measure, checkpoint, progress)
    result = with_kl_losses(table, kl, {**settings, "seconds": time.perf_counter() - start}, calibrate_on=measure)
    result.save(Path(table_path))
    checkpoint.unlink(missing_ok=True)
    return result


def with_kl_around(
    loaded: LoadedModel,
    table: SensitivityTable,
    table_path: Path,
    calibration_text: str,
    base: Mapping[str, str],
    windows: int = 1,
    seqlen: int | None = None,
    progress: bool = True,
) -> SensitivityTable:
    """A copy of ``table`` with ``kl_local`` added: for every (layer, option), the measured KL increase of
    switching that one layer of the ``base`` allocation (layer name -> option label) to that option, every
    other layer at its base option (kept weights), against the unquantized reference; 0 at the base option.

    ``kl`` linearizes the model's KL around the float model (each layer quantized alone); near a real
    allocation the layers' errors interact (results/allocation.md: the summed prediction overshoots the
    measured KL), so re-solving on ``kl_local`` is a first-order step around ``base`` instead. Not saved
    to the table (it belongs to one allocation); an interrupted measurement resumes from a checkpoint
    keyed by the base allocation and the windows.
    """
    seqlen = _kl_seqlen(table, windows, seqlen)
    unknown = sorted(set(table.names) ^ set(base))
    if unknown:
        raise BitallocError(f"the base allocation must name every profiled layer exactly (first mismatch: {unknown[0]})")
    weights = OptionWeights.beside(table_path, table.labels)
    probe = KLProbe(loaded.model, _kl_windows(loaded, table, calibration_text, windows, seqlen), base=weights.assemble(dict(base)))
    at_base = probe.mean_kl({})
    available = anchor_mask(table, None)
    measure = available & (np.array(table.labels)[None, :] != np.array([base[n] for n in table.names])[:, None])
    settings = {"windows": windows, "seqlen": seqlen, "base": dict(sorted(base.items()))}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    checkpoint = Path(table_path).with_suffix(f".kl-local-{digest}.npy")
    start = time.perf_counter()
    kl = measure_kept_kl(probe, weights, table.names, table.labels, measure, checkpoint, progress)
    local = np.where(measure, kl - at_base, np.where(available, 0.0, np.nan))
    descriptions = {**table.metadata.get("losses", {}), KL_LOCAL: (
        f"KL increase of switching one layer of a base allocation (KL {at_base:.4f}) to this option, on {windows} x {seqlen} "
        "calibration tokens; 0 at the base option")}
    metadata = {**table.metadata, "losses": descriptions,
                KL_LOCAL: {"windows": windows, "seqlen": seqlen, "base_kl": at_base, "seconds": time.perf_counter() - start}}
    checkpoint.unlink(missing_ok=True)
    return dataclasses.replace(table, losses={**table.losses, KL_LOCAL: local}, metadata=metadata)


__all__ = ["KL_ESTIMATE_ANCHORS", "add_kl_losses", "anchor_mask", "calibrated_kl", "layer_gains", "measure_kept_kl", "with_kl_around", "with_kl_losses"]
