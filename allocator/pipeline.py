"""The main job: load a model and text, quantize variants, and evaluate them side by side."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Mapping

from allocator.accounting import model_size_bytes
from allocator.apply import QuantizedModel, quantize_model
from allocator.corpus import Corpus
from allocator.evaluate import REFERENCE, evaluate
from allocator.layers import quantizable_linears
from allocator.models import LoadedModel
from allocator.tokens import calibration_samples, evaluation_windows
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


@dataclass
class VariantRow:
    name: str
    bpw: float | None
    """Stored bits per weight of the quantized linears (None for the float reference)."""
    model_mb: float
    perplexity: float
    ppl_ratio: float
    kl: float
    quantize_seconds: float
    eval_seconds: float
    eval_tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def compare_variants(
    loaded: LoadedModel,
    corpus: Corpus,
    variants: Mapping[str, Quantizer],
    settings: EvalSettings = EvalSettings(),
    progress: bool = True,
) -> list[VariantRow]:
    """Quantize all decoder linears with each quantizer and evaluate every variant against the
    float reference on the same windows. The first row is the reference."""
    model = loaded.model
    windows = evaluation_windows(loaded.tokenizer, corpus.evaluation, settings.seqlen, settings.tokens, loaded.add_bos)
    samples = None
    if any(q.uses_hessian for q in variants.values()):
        samples = calibration_samples(
            loaded.tokenizer, corpus.calibration, settings.samples, settings.seqlen, loaded.add_bos, settings.seed
        )
    linears = list(quantizable_linears(model))
    quantized: dict[str, QuantizedModel] = {}
    quantize_seconds: dict[str, float] = {}
    for name, quantizer in variants.items():
        start = time.perf_counter()
        quantized[name] = quantize_model(
            model, {layer: quantizer for layer in linears}, samples, settings.true_sequential, progress
        )
        quantize_seconds[name] = time.perf_counter() - start
    results = evaluate(model, windows, {n: q.dequantized_weights() for n, q in quantized.items()}, progress)
    reference = results[REFERENCE]
    rows = [_row(REFERENCE, None, model_size_bytes(model), reference, reference.perplexity, 0.0)]
    for name, qm in quantized.items():
        rows.append(_row(name, qm.bits_per_weight, model_size_bytes(model, qm), results[name], reference.perplexity, quantize_seconds[name]))
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
