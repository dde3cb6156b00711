"""Weight quantizers behind one interface (:class:`quantizers.base.Quantizer`)."""

from __future__ import annotations

from typing import Any

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer
from quantizers.formats import decode
from quantizers.gptq import GPTQQuantizer
from quantizers.rtn import RTNQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {
    RTNQuantizer.name: RTNQuantizer,
    GPTQQuantizer.name: GPTQQuantizer,
}


def build_quantizer(name: str, **settings: Any) -> Quantizer:
    """Instantiate a registered quantizer by name (the inverse of ``Quantizer.settings()``)."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose from {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name](**settings)


__all__ = ["GroupLayout", "QuantizedTensor", "Quantizer", "QUANTIZERS", "build_quantizer", "decode", "GPTQQuantizer", "RTNQuantizer"]
