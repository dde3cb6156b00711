"""XNOR binarization (Rastegari et al., 2016): ``W ~ alpha * sign(W)``.

For a group of weights ``w`` the L2-optimal binary approximation ``alpha * b`` with
``b in {-1, +1}^n`` is ``b = sign(w)`` and ``alpha = ||w||_1 / n = mean |w|``. One ``alpha`` per
output row (``group_size=None``) or per ``group_size`` consecutive input columns of a row.

Stored form: the symmetric 1-bit uniform grid of :mod:`quantizers.formats` (``(q - 1/2) * s`` with
code ``q = [w >= 0]`` and ``s = 2 * alpha``), i.e. one packed sign bit per weight plus one float16
scale per (row, group): ``1 + 16 / group_size`` bits per weight.
"""

from __future__ import annotations

from typing import Any

import torch

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer, checked_group_size
from quantizers.binary_formats import to_scale
from quantizers.formats import encode_uniform_grid, uniform_grid_storage_bits
from quantizers.grid import GridSpec

XNOR_GRID = GridSpec(bits=1, symmetric=True)


class XNORQuantizer(Quantizer):
    """``sign(w) * mean|w|`` per row or per column group; needs no calibration data.

    Args:
        group_size: input columns sharing one scale (None: one scale per output row).
    """

    name = "xnor"
    one_bit = True

    def __init__(self, group_size: int | None = None) -> None:
        self.group_size = checked_group_size(group_size)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        w = weight.detach().float()
        rows, cols = w.shape
        layout = GroupLayout(cols, self.group_size)
        scales = torch.empty(rows, layout.count)
        for g in range(layout.count):
            start, stop = layout.bounds(g)
            # Grid step s = 2 * alpha, rounded to its stored float16 value. An all-zero group keeps
            # s = 0 (it decodes to zeros), unlike fit_minmax's fallback scale of 1.
            scales[:, g] = to_scale(2 * w[:, start:stop].abs().mean(dim=1))
        codes = (w >= 0).float()
        zeros = torch.full_like(scales, XNOR_GRID.symmetric_zero())
        return encode_uniform_grid(codes, scales, zeros, XNOR_GRID, layout)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return uniform_grid_storage_bits((out_features, in_features), XNOR_GRID, GroupLayout(in_features, self.group_size))

    def settings(self) -> dict[str, Any]:
        return {"quantizer": self.name, "group_size": self.group_size}

    def label(self) -> str:
        return "xnor" if self.group_size is None else f"xnor-g{self.group_size}"
