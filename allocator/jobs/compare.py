"""Side by side: quantize variants of a model and evaluate them against the float reference on the same windows."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from allocator.evaluate.accounting import model_size_bytes
from allocator.evaluate.perplexity import REFERENCE, evaluate
from allocator.evaluate.rows import VariantRow
from allocator.model.corpus import Corpus
from allocator.model.layers import quantizable_linears
from allocator.model.loading import LoadedModel
from allocator.model.placement import CPU
from allocator.model.tokens import calibration_samples, evaluation_windows
from allocator.quantize.apply import QuantizedModel, quantize_model, quantize_with_scale_fold
from allocator.quantize.scalefold import ScaleFoldSettings
from allocator.table.assignment import Assignment
from quantizers import Quantizer


@dataclass(frozen=True)
class EvalSettings:
    seqlen: int = 512
    tokens: int = 16384
    """Evaluation tokens: ``tokens // seqlen`` non-overlapping windows."""
    samples: int = 64
    """Calibration sequences of ``seqlen`` tokens (used by Hessian-based quantizers)."""
    seed: int = 0
    true_sequential: bool = True


def calibration_tokens(loaded: LoadedModel, corpus: Corpus, settings: EvalSettings) -> torch.Tensor:
    """The seeded calibration samples of ``settings`` (``samples`` x ``seqlen`` token ids)."""
    loaded.check_window(settings.seqlen)
    return calibration_samples(loaded.tokenizer, corpus.calibration, settings.samples, settings.seqlen, loaded.add_bos, settings.seed)


def evaluation_tokens(loaded: LoadedModel, corpus: Corpus, settings: EvalSettings) -> torch.Tensor:
    """The evaluation windows of ``settings`` (``tokens // seqlen`` x ``seqlen`` token ids)."""
    loaded.check_window(settings.seqlen)
    return evaluation_windows(loaded.tokenizer, corpus.evaluation, settings.seqlen, settings.tokens, loaded.add_bos)


def quantize_assignment(
    loaded: LoadedModel,
    corpus: Corpus,
    assignment: Assignment | Mapping[str, Quantizer],
    settings: EvalSettings = EvalSettings(),
    progress: bool = True,
    scale_fold: ScaleFoldSettings | None = None,
    device: torch.device = CPU,
    keep_dequantized: bool = True,
) -> QuantizedModel:
    """Quantize the modules of ``assignment`` (settings, or quantizers already built; calibrating on
    ``corpus`` when a quantizer needs it); with ``scale_fold``, on the scale-folded model
    (:func:`allocator.quantize.apply.quantize_with_scale_fold`, which always calibrates, on the CPU). Blocks run on
    ``device``; ``keep_dequantized``: :func:`allocator.quantize.apply.quantize_model`'s."""
    quantizers = assignment.quantizers() if isinstance(assignment, Assignment) else assignment
    if scale_fold is not None:
        samples = calibration_tokens(loaded, corpus, settings)
        return quantize_with_scale_fold(loaded.model, quantizers, samples, scale_fold, settings.true_sequential, progress)
    samples = calibration_tokens(loaded, corpus, settings) if any(q.uses_hessian for q in quantizers.values()) else None
    return quantize_model(loaded.model, quantizers, samples, settings.true_sequential, progress, device, keep_dequantized)


def compare_variants(
    loaded: LoadedModel,
    corpus: Corpus,
    variants: Mapping[str, Quantizer],
    settings: EvalSettings = EvalSettings(),
    progress: bool = True,
) -> list[VariantRow]:
    """Quantize all decoder linears with each quantizer and evaluate every variant against the
    float reference on the same windows. The first row is the reference."""
    windows = evaluation_tokens(loaded, corpus, settings)  # first: bad settings fail before quantizing
    # Tokenize the calibration text once for all variants, not once per variant.
    samples = calibration_tokens(loaded, corpus, settings) if any(q.uses_hessian for q in variants.values()) else None
    linears = list(quantizable_linears(loaded.model))
    quantized: dict[str, QuantizedModel] = {}
    quantize_seconds: dict[str, float] = {}
    for name, quantizer in variants.items():
        start = time.perf_counter()
        quantizers = {layer: quantizer for layer in linears}
        quantized[name] = quantize_model(loaded.model, quantizers, samples, settings.true_sequential, progress)
        quantize_seconds[name] = time.perf_counter() - start
    return compare_quantized(loaded, corpus, quantized, settings, quantize_seconds, progress, windows)


def compare_quantized(
    loaded: LoadedModel,
    corpus: Corpus,
    quantized: Mapping[str, QuantizedModel],
    settings: EvalSettings = EvalSettings(),
    quantize_seconds: Mapping[str, float] | None = None,
    progress: bool = True,
    windows: torch.Tensor | None = None,
    device: torch.device = CPU,
) -> list[VariantRow]:
    """Evaluate already quantized variants (module name -> quantized tensor, any subset of the
    linears) against the float reference on the same windows (default: :func:`evaluation_tokens`).
    The first row is the reference."""
    model = loaded.model
    if windows is None:
        windows = evaluation_tokens(loaded, corpus, settings)
    results = evaluate(model, windows, {n: q.dequantized_weights() for n, q in quantized.items()}, progress, device)
    reference = results[REFERENCE]
    rows = [_row(REFERENCE, None, model_size_bytes(model), reference, reference.perplexity, 0.0)]
    for name, qm in quantized.items():
        seconds = (quantize_seconds or {}).get(name, 0.0)
        rows.append(_row(name, qm.bits_per_weight, model_size_bytes(model, qm), results[name], reference.perplexity, seconds))
    return rows


def _row(name, bpw, size_bytes, result, reference_ppl, quantize_seconds) -> VariantRow:
    return VariantRow(
        name=name,
        bpw=bpw,
        model_mb=size_bytes / 1e6,
        perplexity=result.perplexity,
        ppl_ratio=result.perplexity / reference_ppl,
        kl=result.kl,
        quantize_seconds=quantize_seconds,
        eval_seconds=result.seconds,
        eval_tokens=result.tokens,
    )
