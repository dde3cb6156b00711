"""Stored forms of quantized weights and their decoders (format constants live here).

Each format turns ``QuantizedTensor.stored`` + ``meta`` back into the float weight. Adding a
quantizer with a new storage layout means adding its decoder to :data:`DECODERS`, the single
registry (layouts too large to live here, like the 1-bit family's in
:mod:`quantizers.binary_formats`, are imported and registered here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from quantizers.base import GroupLayout, QuantizedTensor
from quantizers.binary_formats import (
    BILLM,
    DYNGROUP,
    PBLLM,
    W1P1,
    decode_billm,
    decode_dyngroup,
    decode_pbllm,
    decode_w1p1,
)
from quantizers.grid import SCALE_DTYPE, GridSpec
from quantizers.packing import pack_codes, packed_nbytes, unpack_codes

UNIFORM_GRID = "uniform_grid"
SCALE_BITS = torch.finfo(SCALE_DTYPE).bits


def uniform_grid_storage_bits(shape: tuple[int, int], spec: GridSpec, layout: GroupLayout) -> int:
    """Bits of the uniform-grid stored form: packed codes + fp16 scales + packed zero points."""
    rows, cols = shape
    groups = rows * layout.count
    total = 8 * packed_nbytes(rows * cols, spec.bits) + SCALE_BITS * groups
    if not spec.symmetric:
        total += 8 * packed_nbytes(groups, spec.bits)
    return total


def encode_uniform_grid(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    spec: GridSpec,
    layout: GroupLayout,
) -> QuantizedTensor:
    """Build the stored form from integer ``codes`` (rows x cols) and per-(row, group) params."""
    rows, cols = codes.shape
    stored = {
        "codes": pack_codes(codes, spec.bits),
        "scales": scales.to(SCALE_DTYPE).contiguous(),
    }
    if not spec.symmetric:
        stored["zeros"] = pack_codes(zeros, spec.bits)
    meta = {"bits": spec.bits, "symmetric": spec.symmetric, "group_size": layout.group_size}
    qt = QuantizedTensor(UNIFORM_GRID, (rows, cols), stored, meta, dequantized=torch.empty(0))
    qt.dequantized = decode_uniform_grid(qt.stored, qt.meta, qt.shape)
    return qt


def decode_uniform_grid(stored: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    spec = GridSpec(meta["bits"], meta["symmetric"])
    layout = GroupLayout(cols, meta["group_size"])
    codes = unpack_codes(stored["codes"], spec.bits, rows * cols).reshape(rows, cols)
    scales = stored["scales"].float()
    if spec.symmetric:
        zeros = torch.full_like(scales, spec.symmetric_zero())
    else:
        zeros = unpack_codes(stored["zeros"], spec.bits, rows * layout.count).reshape(rows, layout.count).float()
    # Expand per-group params to per-column and dequantize the whole matrix at once. Groups are contiguous column runs
    # (the last may be shorter), so repeat_interleave expands them: 10x faster on CPU than gathering by column index.
    sizes = torch.tensor([stop - start for start, stop in map(layout.bounds, range(layout.count))])
    return (codes.float() - zeros.repeat_interleave(sizes, dim=1)) * scales.repeat_interleave(sizes, dim=1)


DECODERS: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any], tuple[int, int]], torch.Tensor]] = {
    UNIFORM_GRID: decode_uniform_grid,
    # The 1-bit family (layouts in quantizers.binary_formats; XNOR uses the uniform grid).
    BILLM: decode_billm,
    PBLLM: decode_pbllm,
    DYNGROUP: decode_dyngroup,
    W1P1: decode_w1p1,
}


def decode(qt: QuantizedTensor) -> torch.Tensor:
    """Rebuild the float weight from the stored form alone."""
    return DECODERS[qt.format](qt.stored, qt.meta, qt.shape)
