"""The features pass: what a features-only policy (RAMP's zero-shot setting) may know of a new model.

A full profile quantizes every layer with every option (GPTQ's column loop per option) on 64 calibration windows,
and ``bitalloc run`` then measures each (layer, option)'s KL with a forward pass: minutes on a 135M model, hours on
a 7B one. The features pass runs the same block-by-block calibration forward of the float model on
:data:`FEATURE_PASS_SAMPLES` windows only, and prices every option by its calibration-free twin
(:func:`cheap_twin_settings`: RTN onto the option's grid without a clipping search for GPTQ and RTN options,
W(1+1) without error feedback, the other options as they are). That gives, with no forward pass ever seeing a
quantized layer:

- the layer features (:mod:`allocator.measure.features`: structure, weight and activation statistics, RTN errors);
- :data:`CHEAP_LOSS`: ``sum_j diag(H)_j ||W[:, j] - Q[:, j]||^2`` of each (layer, option)'s twin, the output error
  the layer would make if its input channels were uncorrelated (a diagonal-Hessian error, one pass over the weight:
  the full ``tr(E H E^T)`` costs a matrix product per option), and ``weight_err`` = ``||W - Q||_F^2``;
- the prior losses (:mod:`allocator.table.prior_losses`), which need nothing measured;
- with ``fisher_windows > 0``, :data:`~allocator.table.losses.FISHER_TWIN`: ``½ Σ F ⊙ (W − Q)²`` of each twin, F the
  diagonal Fisher of the mean per-token KL (:mod:`allocator.measure.fisher`, labels sampled from the model) on the
  first ``fisher_windows`` calibration windows cut to ``fisher_seqlen`` tokens: one forward and backward per window
  of the whole model, still no quantized forward (what a loss model reads, :mod:`policies.loss_model`);
- each option's exact stored bits (each twin stores exactly what its option stores, which is checked).

Without activation statistics (``activation_statistics=False``, ``bitalloc features --no-activation-statistics``; what
``bitalloc run --loss-model`` runs when its loss model reads only structure and the Fisher input) the calibration
forward is left out: the layers are measured from their weights alone (:func:`allocator.measure.features.measure_weight`:
the activation features are NaN), the twins are priced without a Hessian (so :data:`CHEAP_LOSS` is absent, and a twin
that needs one is refused), and the Fisher pass is the only forward: 17.5 s instead of 36 s on SmolLM2-135M, 8% of
its profile (results/loss_model_transfer.md).

The result is a :class:`SensitivityTable` marked ``features_only`` (its metadata holds ``features_pass``: the
settings and the wall time), so the solvers run on it as on any table, and a features-only policy observes it and
nothing else (:mod:`envs.observation`). It is cached under ``$BITALLOC_CACHE/features``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from allocator.errors import BitallocError
from allocator.evaluate.accounting import OTHER_TENSOR_BITS, model_size_bytes
from allocator.measure.features import FEATURE_NAMES, FEATURE_SCHEMA, LayerMeasurements, feature_matrix, measure_layer, measure_weight
from allocator.measure.fisher import fisher_diagonals
from allocator.measure.fisher_gradients import SAMPLED
from allocator.measure.profile import CODE_VERSION, cached_table, collect_and_run, layer_inputs, model_fingerprint, model_slug, profile_cache_id
from allocator.model.arch import tie_groups
from allocator.model.calibration import capture_block_inputs
from allocator.model.corpus import Corpus
from allocator.model.layers import decoder_layers, decoder_prefix, layer_linears, quantizable_linears
from allocator.model.loading import LoadedModel
from allocator.model.placement import CPU, working_block
from allocator.model.tokens import calibration_samples
from allocator.storage import cache_dir
from allocator.table.losses import FISHER_TWIN, WEIGHT_ERR
from allocator.table.options import Option, quantizer_from_settings
from allocator.table.prior_losses import prior_losses
from allocator.table.sensitivity import FEATURES_PASS_KEY, SensitivityTable, TableKey
from quantizers import Quantizer

log = logging.getLogger(__name__)

FEATURE_PASS_SAMPLES = 8
"""Calibration windows of the features pass (the full profile takes 64)."""
FEATURE_PASS_SEQLEN = 512
FISHER_TWIN_SEQLEN = 128
"""Tokens per window of the Fisher input (4 x 128 predicts layer levels as well as 4 x 512 at a fraction of the
cost on both real models: results/loss_model_transfer.md)."""
FEATURES_PASS_VERSION = "features-pass-v1"
"""Enters the table key's code version; bump it when the pass computes anything differently."""
WEIGHTS_ONLY = "weights-only"
"""Enters the table key's code version of a pass without activation statistics."""
TWIN_EM_ITERATIONS = 4
"""EM rounds of the W(1+1) twin (the option itself runs up to 30)."""
CHEAP_LOSS = "hdiag_err"
"""The twins' diagonal-Hessian error (module doc)."""
SHAPE_LOSS = "twin_shape"
"""The features table's default loss: the ``flat`` rule's value at each layer's widest option, spread over its other
options in proportion to their :data:`CHEAP_LOSS`. The absolute twin error ranks layers by their activation scale,
which says little about what a layer does to the output (its ILP is far worse than the flat rule's on both real
models: results/policy_zeroshot.md); its ratios between one layer's options do carry how that layer quantizes."""
LOSS_DESCRIPTIONS = {
    CHEAP_LOSS: "sum_j diag(H)_j ||W[:, j] - Q[:, j]||^2 of the option's calibration-free twin (features pass)",
    WEIGHT_ERR: "||W - Q||_F^2 of the option's calibration-free twin (features pass)",
}


def cheap_twin_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The calibration-free quantizer the features pass prices an option of ``settings`` with (module doc)."""
    name = settings.get("quantizer")
    if name in ("gptq", "rtn"):
        return {"quantizer": "rtn", **{k: settings[k] for k in ("bits", "group_size", "symmetric") if k in settings}}
    if name == "w1p1":
        return {**settings, "error_feedback": False, "weighting": "plain", "em_iterations": TWIN_EM_ITERATIONS}
    return dict(settings)


def twins_needing_hessian(options: Sequence[Option]) -> list[str]:
    """Labels of the options whose calibration-free twin needs the input Hessian: a pass without activation
    statistics cannot price them."""
    return [o.label for o in options if quantizer_from_settings(cheap_twin_settings(o.settings)).needs_hessian()]


def features_table(
    loaded: LoadedModel,
    corpus: Corpus,
    options: Sequence[Option],
    samples: int = FEATURE_PASS_SAMPLES,
    seqlen: int = FEATURE_PASS_SEQLEN,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
    device: torch.device = CPU,
    fisher_windows: int = 0,
    fisher_seqlen: int = FISHER_TWIN_SEQLEN,
    activation_statistics: bool = True,
) -> SensitivityTable:
    """The features table of ``loaded`` for ``options`` (module doc), from the cache when it was made before with
    the same settings; ``metadata["features_pass"]["seconds"]`` is the pass's wall time when it was computed (the
    Fisher input's share under ``["fisher"]["seconds"]``). Without ``activation_statistics`` the calibration forward
    is left out (module doc: what a loss model reading only structure and the Fisher input needs)."""
    start = time.perf_counter()
    options = list(options)
    if not options:
        raise BitallocError("the features pass needs at least one option")
    model = loaded.model
    names = list(quantizable_linears(model))
    if not names:
        raise BitallocError(f"{loaded.name} has no linear layers in its decoder blocks")
    if not 0 <= fisher_windows <= samples or (fisher_windows and not 2 <= fisher_seqlen <= seqlen):
        raise BitallocError(f"the Fisher input takes 0 to {samples} of the pass's windows of 2 to {seqlen} tokens, "
                            f"got {fisher_windows} x {fisher_seqlen}")
    if not activation_statistics and (needing := twins_needing_hessian(options)):
        raise BitallocError(f"the twins of {', '.join(needing)} need the input Hessian: price them with activation statistics")
    twins = [(quantizer_from_settings(o.settings), quantizer_from_settings(cheap_twin_settings(o.settings))) for o in options]
    version = (f"{CODE_VERSION}+{FEATURES_PASS_VERSION}" + (f"+fisher{fisher_windows}x{fisher_seqlen}" if fisher_windows else "")
               + ("" if activation_statistics else f"+{WEIGHTS_ONLY}"))
    key = TableKey(model=loaded.name, corpus=corpus.name, samples=samples, seqlen=seqlen, code_version=version, seed=seed)
    fingerprint = model_fingerprint(model)
    cache_id = profile_cache_id(key, options, fingerprint, False, 0)
    path = _cache_path(loaded.name, cache_id)
    labels = [o.label for o in options]
    cached = cached_table(path, key, labels, names) if cache else None
    if cached is not None:
        log.info("using the cached features table %s", path)
        return with_rules(cached)
    tokens = calibration_samples(loaded.tokenizer, corpus.calibration, samples, seqlen, loaded.add_bos, seed)
    fisher, fisher_seconds = None, 0.0
    if fisher_windows:
        fisher_start = time.perf_counter()
        fisher = fisher_diagonals(model, tokens[:fisher_windows, :fisher_seqlen], [SAMPLED], seed, progress=progress)[SAMPLED].diagonal
        fisher_seconds = time.perf_counter() - fisher_start
    if activation_statistics:
        rows = _measure_layers(model, tokens, twins, progress, device, fisher)
    else:
        rows = _measure_weights(model, twins, progress, fisher)
    total_numel = sum(rows[n][0].numel for n in names)
    seconds = time.perf_counter() - start
    metadata = {
        "cache_id": cache_id,
        "model_fingerprint": fingerprint,
        "calibration_tokens": samples * seqlen if activation_statistics else fisher_windows * fisher_seqlen,
        "add_bos": loaded.add_bos,
        "other_bytes": model_size_bytes(model) - total_numel * OTHER_TENSOR_BITS // 8,
        "losses": {k: v for k, v in LOSS_DESCRIPTIONS.items() if activation_statistics or k != CHEAP_LOSS},
        "seconds": seconds,
        FEATURES_PASS_KEY: {"version": FEATURES_PASS_VERSION, "samples": samples, "seqlen": seqlen, "seconds": seconds,
                            "activation_statistics": activation_statistics,
                            "twins": [cheap_twin_settings(o.settings) for o in options],
                            **({"fisher": {"windows": fisher_windows, "seqlen": fisher_seqlen, "seconds": fisher_seconds}} if fisher_windows else {})},
    }
    measurements = [rows[n][0] for n in names]
    table = SensitivityTable(
        names=names,
        numel=np.array([m.numel for m in measurements], dtype=np.int64),
        tie_group=tie_groups(names),
        options=options,
        bits=np.array([rows[n][1] for n in names], dtype=np.int64),
        losses={**({CHEAP_LOSS: np.array([rows[n][2] for n in names])} if activation_statistics else {}),
                WEIGHT_ERR: np.array([rows[n][3] for n in names]),
                **({FISHER_TWIN: np.array([rows[n][4] for n in names])} if fisher is not None else {})},
        key=key,
        features=feature_matrix(measurements),
        feature_names=list(FEATURE_NAMES),
        feature_schema=FEATURE_SCHEMA,
        metadata=metadata,
    )
    if cache:
        table.save(path)  # the measurements; the rules are derived from them on every read
    return with_rules(table)


def with_rules(table: SensitivityTable) -> SensitivityTable:
    """``table`` (the twins' measurements) with :data:`SHAPE_LOSS` first (the default loss) and the prior rules added;
    without activation statistics the shape is read from the twins' weight error instead of :data:`CHEAP_LOSS`."""
    priors = prior_losses(table)
    cheap = table.losses[CHEAP_LOSS] if CHEAP_LOSS in table.losses else table.losses[WEIGHT_ERR]
    bits = np.where(np.isfinite(cheap), table.bits, -1)
    widest = bits.argmax(axis=1)
    rows = np.arange(table.num_layers)
    shape = priors["flat"][rows, widest][:, None] * cheap / np.maximum(cheap[rows, widest], 1e-30)[:, None]
    return dataclasses.replace(table, losses={SHAPE_LOSS: shape, **table.losses, **priors})


def _cache_path(model: str, cache_id: str) -> Path:
    return cache_dir("features") / f"{model_slug(model)}-{cache_id}.npz"  # a model given as a path stays out of its folder


def features_table_path(table: SensitivityTable) -> Path:
    """Where :func:`features_table` caches ``table``."""
    return _cache_path(table.key.model, str(table.metadata["cache_id"]))


Row = tuple[LayerMeasurements, list[int], list[float], list[float], list[float]]
"""A layer's measurements, and per option: stored bits, the cheap loss (NaN without activation statistics), the weight
error and the Fisher twin error (empty without a Fisher input)."""


@torch.inference_mode()
def _measure_layers(model: PreTrainedModel, tokens: torch.Tensor, twins: Sequence[tuple[Quantizer, Quantizer]], progress: bool,
                    device: torch.device, fisher: Mapping[str, torch.Tensor] | None = None) -> dict[str, Row]:
    """Every layer's row from the calibration forward: the option's own stored bits (known from the shape), its
    twin's errors."""
    inputs = capture_block_inputs(model, tokens, device=device)
    hidden = inputs.hidden_states
    prefix = decoder_prefix(model)
    layers = decoder_layers(model)
    rows: dict[str, Row] = {}
    for index in tqdm(range(len(layers)), desc="features pass", disable=not progress):
        with working_block(layers[index], device) as block:
            linears = layer_linears(block)
            stats, hidden = collect_and_run(block, list(linears), hidden, inputs.block_kwargs[index])
            weights_of = {local: module.weight.detach().float().cpu() for local, module in linears.items()}
        for local, weight in weights_of.items():
            name = f"{prefix}.{index}.{local}"
            if local not in stats:
                raise BitallocError(f"{name} saw no calibration input in the features pass")
            w, hessian = layer_inputs(weight, stats[local])
            measurements = measure_layer(name, w, hessian, stats[local].absmax.cpu(), index, len(layers))
            rows[name] = (measurements, *_price_twins(w, hessian, twins, fisher[name] if fisher is not None else None))
        del stats
    return rows


@torch.inference_mode()
def _measure_weights(model: PreTrainedModel, twins: Sequence[tuple[Quantizer, Quantizer]], progress: bool,
                     fisher: Mapping[str, torch.Tensor] | None = None) -> dict[str, Row]:
    """Every layer's row from its weight alone (no calibration forward)."""
    prefix = decoder_prefix(model)
    layers = decoder_layers(model)
    rows: dict[str, Row] = {}
    for index in tqdm(range(len(layers)), desc="features pass (weights)", disable=not progress):
        for local, module in layer_linears(layers[index]).items():
            name = f"{prefix}.{index}.{local}"
            w = module.weight.detach().float().cpu()
            rows[name] = (measure_weight(name, w, index, len(layers)), *_price_twins(w, None, twins, fisher[name] if fisher is not None else None))
    return rows


def _price_twins(w: torch.Tensor, hessian: torch.Tensor | None, twins: Sequence[tuple[Quantizer, Quantizer]],
                 layer_fisher: torch.Tensor | None) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per (option's quantizer, its twin): the option's stored bits, the twin's diagonal-Hessian error (NaN without ``hessian``), weight error and Fisher
    twin error (none without ``layer_fisher``)."""
    h_diag = torch.diagonal(hessian).clamp_min(0) if hessian is not None else None
    fisher = layer_fisher.float().cpu() if layer_fisher is not None else None
    bits, cheap, plain, fisher_err = [], [], [], []
    for option, twin in twins:
        quantized = twin.quantize(w, hessian if twin.uses_hessian else None)
        squared = (w - quantized.dequantized.float()).square()
        bits.append(int(option.storage_bits(*w.shape)))
        cheap.append(float(squared.sum(dim=0) @ h_diag) if h_diag is not None else math.nan)
        plain.append(float(squared.sum()))
        if fisher is not None:
            fisher_err.append(0.5 * float((fisher * squared).sum()))
    return bits, cheap, plain, fisher_err


__all__ = ["CHEAP_LOSS", "FEATURE_PASS_SAMPLES", "FEATURE_PASS_SEQLEN", "SHAPE_LOSS", "cheap_twin_settings", "features_table",
           "features_table_path", "twins_needing_hessian", "with_rules"]
