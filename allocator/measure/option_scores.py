"""One layer under every candidate option: its quantized weights, stored bits and weight-space losses.

This is the profile's unit of work, the same whether it runs in the profiling process or on a Ray worker
(:mod:`allocator.measure.distributed`): a pure function of the layer's weight, its input Hessian and the
quantizers, so a table is the same wherever its units ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantizers import QuantizedTensor, Quantizer
from quantizers.base import single_threaded
from quantizers.gptq import GPTQQuantizer, gptq_many


@dataclass
class OptionScore:
    """One option's result on one layer."""

    bits: int
    """Exact stored bits of the quantized tensor."""
    hessian_err: float
    """``tr((W - Q) H (W - Q)^T)``."""
    weight_err: float
    """``||W - Q||_F^2``."""
    quantized: QuantizedTensor


def option_groups(quantizers: Sequence[Quantizer]) -> list[list[int]]:
    """Indices of ``quantizers`` that share their work: GPTQ options with one column loop form a group
    (:func:`quantizers.gptq.gptq_many`), every other quantizer is a group alone. Groups are independent units."""
    groups: list[list[int]] = []
    loops: dict[tuple, list[int]] = {}
    for index, quantizer in enumerate(quantizers):
        if isinstance(quantizer, GPTQQuantizer):
            if quantizer.column_loop not in loops:
                loops[quantizer.column_loop] = []
                groups.append(loops[quantizer.column_loop])
            loops[quantizer.column_loop].append(index)
        else:
            groups.append([index])
    return groups


def quantize_options(quantizers: Sequence[Quantizer], weight: torch.Tensor, hessian: torch.Tensor) -> list[QuantizedTensor]:
    """Every quantizer's result on one layer, in order; GPTQ options differing only in their grids share one column
    loop (bit-identical to quantizing one by one)."""
    results: dict[int, QuantizedTensor] = {}
    for group in option_groups(quantizers):
        members = [quantizers[i] for i in group]
        if isinstance(members[0], GPTQQuantizer):
            results.update(zip(group, gptq_many(members, weight, hessian)))  # type: ignore[arg-type]
        else:
            results[group[0]] = members[0].quantize(weight, hessian)
    return [results[index] for index in range(len(quantizers))]


@torch.inference_mode()
def score_options(quantizers: Sequence[Quantizer], weight: torch.Tensor, hessian: torch.Tensor) -> list[OptionScore]:
    """Quantize the layer ``weight`` (fp32) with every quantizer and measure each result's losses under ``hessian``."""
    results = quantize_options(quantizers, weight, hessian)
    h = hessian.double()  # made after the quantizers ran: not alive beside their own n x n temporaries
    scores = []
    with single_threaded():  # a threaded sum rounds by its thread count: one thread gives every process the same bits
        for qt in results:
            error = (weight - qt.dequantized).double()
            scores.append(OptionScore(qt.storage_bits, float(((error @ h) * error).sum()), float((error**2).sum()), qt))
    return scores


__all__ = ["OptionScore", "option_groups", "quantize_options", "score_options"]
