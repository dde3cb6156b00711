"""Fisher-weighted losses of a profile's options: ``½ Σ F ⊙ (W − Q)²`` per (layer, option), added to its table.

With F the diagonal Fisher of the mean per-token KL (:mod:`allocator.measure.fisher`), ``½ Σ F ⊙ (W − Q)²``
is the second-order estimate of the mean per-token KL(reference || model) with only that layer quantized to
``Q`` (the option's kept weight, :mod:`allocator.measure.option_weights`): the measured ``kl`` loss, priced
from one gradient pass over calibration windows instead of one forward per (layer, option).
Two losses, one per Fisher variant: ``fisher`` (labels drawn from the model, the true Fisher) and
``fisher_emp`` (labels from the text, the empirical Fisher).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from allocator.errors import BitallocError
from allocator.measure.distributed import RaySettings
from allocator.measure.fisher import FisherDiagonal, cached_fisher
from allocator.measure.fisher_gradients import EMPIRICAL, SAMPLED, VARIANTS
from allocator.measure.option_weights import OptionWeights
from allocator.model.layers import quantizable_linears
from allocator.model.loading import LoadedModel
from allocator.model.tokens import calibration_samples
from allocator.table.losses import FISHER, FISHER_EMPIRICAL
from allocator.table.sensitivity import NOT_APPLICABLE, SensitivityTable

log = logging.getLogger(__name__)

DEFAULT_FISHER_WINDOWS = 16
"""Calibration windows of the gradient pass (the probe on SmolLM2: 16 x 512 tokens, about 4 minutes on 2 cores)."""
DEFAULT_FISHER_SEQLEN = 512
"""Tokens per window (or the profile's seqlen, if shorter)."""
FISHER_METADATA = "fisher"
"""Metadata key of the pass's settings and cost."""
LOSS_OF_VARIANT = {SAMPLED: FISHER, EMPIRICAL: FISHER_EMPIRICAL}


def fisher_weighted_errors(
    diagonal: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    weights: OptionWeights,
    names: Sequence[str],
    labels: Sequence[str],
    applicable: np.ndarray,
) -> np.ndarray:
    """L x O matrix of ``½ Σ F ⊙ (W − Q)²`` (float64 sums) with ``W = reference[layer]`` and ``Q`` the kept weight
    of (layer, option); NaN where ``applicable`` (L x O bool) is unset or the layer has no kept weights."""
    result = np.full((len(names), len(labels)), np.nan)
    for i, name in enumerate(names):
        if not weights.has(name):
            continue
        fisher = diagonal[name].double()
        w = reference[name].detach().double()
        for j in np.flatnonzero(applicable[i]):
            error = w - weights.load(name, labels[int(j)]).double()
            result[i, j] = 0.5 * float((fisher * error * error).sum())
    return result


def with_fisher_losses(table: SensitivityTable, losses: Mapping[str, np.ndarray], settings: dict) -> SensitivityTable:
    """A copy of ``table`` with the Fisher losses (loss name -> L x O) added and ``settings`` (windows, seqlen,
    seed, variants, seconds, passes) in its metadata; a Fisher loss of other settings not among them is dropped."""
    stale = set(LOSS_OF_VARIANT.values()) - set(losses)
    kept_losses = {name: loss for name, loss in table.losses.items() if name not in stale}
    descriptions = {name: text for name, text in table.metadata.get("losses", {}).items() if name not in stale}
    source = f"{settings['windows']} x {settings['seqlen']} calibration tokens (seed {settings['seed']})"
    if FISHER in losses:
        descriptions[FISHER] = (f"½ Σ F ⊙ (W − Q)², F = diagonal Fisher of the mean per-token NLL of labels drawn from the reference, on {source}: "
                                "the second-order mean per-token KL of this layer quantized alone (kept weight); NaN where no kept weight")
    if FISHER_EMPIRICAL in losses:
        descriptions[FISHER_EMPIRICAL] = (f"½ Σ F ⊙ (W − Q)², F = squared gradient of the text's mean per-token NLL (empirical Fisher), on {source}; "
                                          "NaN where no kept weight")
    metadata = {**table.metadata, FISHER_METADATA: settings, "losses": descriptions}
    return dataclasses.replace(table, losses={**kept_losses, **losses}, metadata=metadata)


def fisher_windows(loaded: LoadedModel, table: SensitivityTable, calibration_text: str, windows: int, seqlen: int | None) -> torch.Tensor:
    """The first ``windows`` windows of the table's own calibration draw, cut to ``seqlen`` tokens
    (default :data:`DEFAULT_FISHER_SEQLEN` or the profile's, if shorter)."""
    key = table.key
    seqlen = min(DEFAULT_FISHER_SEQLEN, key.seqlen) if seqlen is None else seqlen
    if not 1 <= windows <= key.samples or not 2 <= seqlen <= key.seqlen:
        raise BitallocError(f"the Fisher is computed on 1 to {key.samples} windows of 2 to {key.seqlen} tokens, got {windows} x {seqlen}")
    tokens = calibration_samples(loaded.tokenizer, calibration_text, key.samples, key.seqlen, loaded.add_bos, key.seed)
    return tokens[:windows, :seqlen]


def _pass_settings(fishers: Mapping[str, FisherDiagonal], windows: torch.Tensor, seed: int, seconds: float) -> dict:
    first = next(iter(fishers.values()))
    return {
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seed": seed,
        "variants": list(fishers),
        "tokens": first.tokens,
        "seconds": seconds,
        "pass_seconds": {v: f.seconds for v, f in fishers.items()},
        "forward_passes": {v: f.forward_passes for v, f in fishers.items()},
        "backward_passes": {v: f.backward_passes for v, f in fishers.items()},
    }


def add_fisher_losses(
    loaded: LoadedModel,
    table: SensitivityTable,
    table_path: Path,
    calibration_text: str,
    windows: int = DEFAULT_FISHER_WINDOWS,
    seqlen: int | None = None,
    variants: Sequence[str] = VARIANTS,
    seed: int | None = None,
    recompute: bool = False,
    progress: bool = True,
    ray: RaySettings | None = None,
) -> SensitivityTable:
    """Add ``fisher`` / ``fisher_emp`` (one per variant) to the table at ``table_path`` and save it there.

    The Fisher comes from one pass over the first ``windows`` windows of the table's calibration draw cut to
    ``seqlen`` tokens, labels sampled with ``seed`` (default: the table's); it is cached and an interrupted
    pass resumes (:func:`allocator.measure.fisher.cached_fisher`; on ``ray``'s cluster if given). The options' weights are the ones kept beside
    the table; a layer without them gets NaN losses. A table already holding these losses from the same
    settings is returned as it is. The metadata records the settings, the wall seconds (``seconds``: this call,
    ``pass_seconds``: the gradient pass, 0-cost when cached) and the forward and backward passes.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise BitallocError(f"unknown Fisher variant {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(VARIANTS)}")
    seed = table.key.seed if seed is None else seed
    tokens = fisher_windows(loaded, table, calibration_text, windows, seqlen)
    done = table.metadata.get(FISHER_METADATA) or {}
    same = (done.get("windows"), done.get("seqlen"), done.get("seed")) == (tokens.shape[0], tokens.shape[1], seed)
    present = [v for v, name in LOSS_OF_VARIANT.items() if name in table.losses] if same else []
    if not recompute and set(variants) <= set(present):
        return table
    variants = [v for v in VARIANTS if v in variants or v in present]  # the table keeps what it had of these settings
    kept = OptionWeights.beside(table_path, table.labels)
    if len(kept.missing(table.names)) == table.num_layers:
        raise BitallocError(f"no kept option weights beside {table_path}; profile again with weights kept (not with --scale-fold)")
    for name in kept.missing(table.names):
        log.warning("%s has no kept weights: its Fisher losses are NaN", name)
    start = time.perf_counter()
    fishers = cached_fisher(loaded.model, loaded.name, table.key.corpus, tokens, variants, seed, recompute, progress, ray)
    linears = quantizable_linears(loaded.model)
    unknown_layers = [n for n in table.names if n not in linears]
    if unknown_layers:
        raise BitallocError(f"{unknown_layers[0]} of the table is not a linear layer of {loaded.name}")
    reference = {n: linears[n].weight for n in table.names}
    applicable = table.bits != NOT_APPLICABLE
    losses = {LOSS_OF_VARIANT[v]: fisher_weighted_errors(f.diagonal, reference, kept, table.names, table.labels, applicable)
              for v, f in fishers.items()}
    result = with_fisher_losses(table, losses, _pass_settings(fishers, tokens, seed, time.perf_counter() - start))
    result.save(Path(table_path))
    return result


__all__ = ["DEFAULT_FISHER_SEQLEN", "DEFAULT_FISHER_WINDOWS", "add_fisher_losses", "fisher_weighted_errors", "fisher_windows", "with_fisher_losses"]
