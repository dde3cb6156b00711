"""Round-to-nearest (RTN): each group of weights snapped to its own uniform grid (min-max or clipped)."""

from __future__ import annotations

from typing import Any

import torch

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer, checked_group_size
from quantizers.formats import encode_uniform_grid, uniform_grid_storage_bits
from quantizers.grid import CLIP_METHODS, GridSpec, fit_grid, fit_minmax, quantize_codes


class RTNQuantizer(Quantizer):
    """Plain round-to-nearest; needs no calibration data.

    ``clip="mse"`` searches each row's clipping range for the least squared rounding error, weighted by
    diag(H) when a Hessian is given (see :mod:`quantizers.grid`).
    """

    name = "rtn"

    def __init__(self, bits: int, group_size: int | None = 128, symmetric: bool = False, clip: str = "minmax") -> None:
        if clip not in CLIP_METHODS:
            raise ValueError(f"unknown clip method {clip!r}; choose from {', '.join(CLIP_METHODS)}")
        self.spec = GridSpec(bits, symmetric)
        self.group_size = checked_group_size(group_size)
        self.clip = clip

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        w = weight.detach().float()
        layout = GroupLayout(w.shape[1], self.group_size)
        if self.clip == "minmax" and w.shape[1] == layout.count * layout.size and not (self.spec.symmetric and self.spec.bits == 1):
            # every group at once: a row's groups are consecutive, so (rows, cols) -> (rows * groups, group) is a view and
            # each of its rows gets the same min, max and elementwise rounding as the group's slice in the loop below
            flat = w.reshape(-1, layout.size)
            scale, zero = fit_minmax(flat, self.spec)
            codes = quantize_codes(flat, scale, zero, self.spec).reshape(w.shape)
            return encode_uniform_grid(codes, scale.reshape(-1, layout.count), zero.reshape(-1, layout.count), self.spec, layout)
        codes = torch.empty_like(w)
        scales = torch.empty(w.shape[0], layout.count)
        zeros = torch.empty_like(scales)
        importance = None if hessian is None else torch.diag(hessian.detach().float())
        for g in range(layout.count):
            start, stop = layout.bounds(g)
            scale, zero = fit_grid(w[:, start:stop], self.spec, self.clip, None if importance is None else importance[start:stop])
            codes[:, start:stop] = quantize_codes(w[:, start:stop], scale, zero, self.spec)
            scales[:, g], zeros[:, g] = scale, zero
        return encode_uniform_grid(codes, scales, zeros, self.spec, layout)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return uniform_grid_storage_bits((out_features, in_features), self.spec, GroupLayout(in_features, self.group_size))

    def settings(self) -> dict[str, Any]:
        settings = {"quantizer": self.name, "bits": self.spec.bits, "group_size": self.group_size, "symmetric": self.spec.symmetric}
        if self.clip != "minmax":  # as in GPTQ: absent for min-max, so older tables and bit maps still match
            settings["clip"] = self.clip
        return settings

    def label(self) -> str:
        group = "" if self.group_size is None else f"g{self.group_size}"
        return f"rtn-w{self.spec.bits}{group}{'-sym' if self.spec.symmetric else ''}{'' if self.clip == 'minmax' else '-' + self.clip}"
