"""Cheap stand-ins for the expensive options of a profile: GPTQ options priced by RTN on the same grid.

GPTQ runs a Python loop over every column of every layer, once per GPTQ option: most of a profile's time.
RTN onto the same grid (bits, group size, symmetry, clipping) stores exactly as many bits and costs a few
milliseconds. A profile made with ``gptq_by_rtn`` measures every loss of a GPTQ option on its RTN twin's
weights; the option itself (and so the bit map, and ``bitalloc quantize``) stays GPTQ, which runs once per
layer on the chosen map. Whether the twin ranks allocations as well is measured in
``benchmarks/results/sensitivity.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from allocator.table.options import quantizer_from_settings
from quantizers import Quantizer

GPTQ_BY_RTN_SUFFIX = "+gptq-by-rtn"
"""What a table's code version appends when its GPTQ options were priced by RTN (so its cache id differs)."""

_RTN_SETTINGS = ("bits", "group_size", "symmetric", "clip")


def rtn_twin_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """RTN settings on the grid of a GPTQ option's ``settings`` (same bits, group size, symmetry and clipping)."""
    return {"quantizer": "rtn", **{k: settings[k] for k in _RTN_SETTINGS if k in settings}}


def pricing_quantizer(settings: Mapping[str, Any], gptq_by_rtn: bool) -> Quantizer:
    """The quantizer whose weights a profile measures for an option of ``settings``."""
    if gptq_by_rtn and settings.get("quantizer") == "gptq":
        return quantizer_from_settings(rtn_twin_settings(settings))
    return quantizer_from_settings(settings)


__all__ = ["GPTQ_BY_RTN_SUFFIX", "pricing_quantizer", "rtn_twin_settings"]
