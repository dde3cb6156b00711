"""Round-to-nearest (RTN): each group of weights snapped to its own min-max uniform grid."""

from __future__ import annotations

from typing import Any

import torch

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer
from quantizers.formats import encode_uniform_grid, uniform_grid_storage_bits
from quantizers.grid import GridSpec, fit_minmax, quantize_codes


class RTNQuantizer(Quantizer):
    """Plain round-to-nearest; needs no calibration data."""

    name = "rtn"

    def __init__(self, bits: int, group_size: int | None = 128, symmetric: bool = False) -> None:
        self.spec = GridSpec(bits, symmetric)
        self.group_size = group_size

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        w = weight.detach().float()
        layout = GroupLayout(w.shape[1], self.group_size)
        codes = torch.empty_like(w)
        scales = torch.empty(w.shape[0], layout.count)
        zeros = torch.empty_like(scales)
        for g in range(layout.count):
            start, stop = layout.bounds(g)
            scale, zero = fit_minmax(w[:, start:stop], self.spec)
            codes[:, start:stop] = quantize_codes(w[:, start:stop], scale, zero, self.spec)
            scales[:, g], zeros[:, g] = scale, zero
        return encode_uniform_grid(codes, scales, zeros, self.spec, layout)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return uniform_grid_storage_bits((out_features, in_features), self.spec, GroupLayout(in_features, self.group_size))

    def settings(self) -> dict[str, Any]:
        return {"quantizer": self.name, "bits": self.spec.bits, "group_size": self.group_size, "symmetric": self.spec.symmetric}

    def label(self) -> str:
        group = "" if self.group_size is None else f"g{self.group_size}"
        return f"rtn-w{self.spec.bits}{group}{'-sym' if self.spec.symmetric else ''}"
