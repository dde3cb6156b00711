"""Weight quantizers behind one interface (:class:`quantizers.base.Quantizer`)."""

from __future__ import annotations

from typing import Any

from quantizers.autoround import AutoRoundQuantizer
from quantizers.base import GroupLayout, QuantizedTensor, Quantizer
from quantizers.billm import BiLLMQuantizer
from quantizers.dyngroup import DynGroupQuantizer
from quantizers.formats import decode
from quantizers.gptq import GPTQQuantizer
from quantizers.pbllm import PBLLMQuantizer
from quantizers.rtn import RTNQuantizer
from quantizers.w1p1 import W1P1Quantizer
from quantizers.xnor import XNORQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    RTNQuantizer.name: RTNQuantizer,
    GPTQQuantizer.name: GPTQQuantizer,
    XNORQuantizer.name: XNORQuantizer,
    BiLLMQuantizer.name: BiLLMQuantizer,
    PBLLMQuantizer.name: PBLLMQuantizer,
    DynGroupQuantizer.name: DynGroupQuantizer,
    W1P1Quantizer.name: W1P1Quantizer,
    AutoRoundQuantizer.name: AutoRoundQuantizer,
}


def build_quantizer(name: str, **settings: Any) -> Quantizer:
    """Instantiate a registered quantizer by name (the inverse of ``Quantizer.settings()``)."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose from {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name](**settings)


__all__ = [
    "GroupLayout",
    "QuantizedTensor",
    "Quantizer",
    "QUANTIZERS",
    "AutoRoundQuantizer",
    "build_quantizer",
    "decode",
    "BiLLMQuantizer",
    "DynGroupQuantizer",
    "GPTQQuantizer",
    "PBLLMQuantizer",
    "RTNQuantizer",
    "W1P1Quantizer",
    "XNORQuantizer",
]
