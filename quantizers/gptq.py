"""GPTQ (Frantar et al., 2023): quantize columns one at a time, compensating each column's
rounding error in the not-yet-quantized columns through the inverse input Hessian.

For a linear layer with inputs X, the layer-wise objective is ||W X - Q X||^2 with Hessian
H = 2 X X^T / n. Quantizing column i with error e_i = (w_i - q_i) / [H^-1]_ii and updating the
remaining columns by -e_i [H^-1]_{i, i:} is the optimal brain surgeon step; GPTQ takes the rows
of the upper Cholesky factor of H^-1 for [H^-1]_{i, i:} and applies updates lazily in blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer, checked_count, checked_damping, checked_flag, checked_group_size, single_threaded
from quantizers.formats import encode_uniform_grid, uniform_grid_storage_bits
from quantizers.grid import CLIP_METHODS, GridSpec, fit_grid


def damped_cholesky(hessian: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """Lower Cholesky factor (float64) of H + damp * mean(diag H) * I, raising the damping tenfold (up to 8 times) while
    H is singular."""
    h = hessian.double()
    mean_diag = torch.diag(h).mean().clamp_min(1e-12)
    damp = damp_ratio
    # n x n float64 temporaries dominate a wide layer's memory (14336^2 x 8 bytes = 1.6 GB for an 8B down_proj): the
    # damping goes onto a copy's diagonal in place, and each intermediate is dropped as soon as the next exists
    for _ in range(8):
        damped = h.clone()
        damped.diagonal().add_(damp * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            return lower
        damp *= 10
    raise ValueError("Hessian is not positive definite even with heavy damping")


def inverse_hessian_cholesky(hessian: torch.Tensor, damp_ratio: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damping if H is singular."""
    lower = damped_cholesky(hessian, damp_ratio)
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True).float()


class GPTQQuantizer(Quantizer):
    """GPTQ onto the same uniform grid (and stored form) as RTN.

    Args:
        bits: code width.
        group_size: columns per scale/zero group (None: one group per row).
        symmetric: symmetric grid without stored zero points.
        damp_ratio: diagonal damping as a fraction of mean(diag H) (the paper's 1%).
        block_size: columns per lazy-update block.
        act_order: process columns by decreasing diag(H). Group parameters are then fitted on the
            original weights of each natural column group ("static groups"), so the stored form
            needs no per-column group index.
        clip: how each group's grid is fitted: ``minmax`` (the paper) or ``mse`` (the shrunk range with
            the least rounding error, weighted by diag(H) of the group's columns; see
            :mod:`quantizers.grid`).
    """

    name = "gptq"
    uses_hessian = True

    def __init__(
        self,
        bits: int,
        group_size: int | None = 128,
        symmetric: bool = False,
        damp_ratio: float = 0.01,
        block_size: int = 128,
        act_order: bool = False,
        clip: str = "minmax",
    ) -> None:
        if clip not in CLIP_METHODS:
            raise ValueError(f"unknown clip method {clip!r}; choose from {', '.join(CLIP_METHODS)}")
        self.spec = GridSpec(bits, symmetric)
        self.group_size = checked_group_size(group_size)
        self.damp_ratio = checked_damping(damp_ratio)
        self.block_size = checked_count(block_size, "block_size")
        self.act_order = checked_flag(act_order, "act_order")
        self.clip = clip

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        if hessian is None:
            raise ValueError("GPTQ needs the layer's input Hessian")
        with single_threaded():
            return self._quantize(weight, hessian)

    def _quantize(self, weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedTensor:
        return _gptq_stacked([self], weight, hessian)[0]

    @property
    def column_loop(self) -> tuple[int | None, bool, float, int]:
        """What the column loop depends on besides the grid: quantizers with equal values share one :func:`gptq_many` loop."""
        return (self.group_size, self.act_order, self.damp_ratio, self.block_size)

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return uniform_grid_storage_bits((out_features, in_features), self.spec, GroupLayout(in_features, self.group_size))

    def settings(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "bits": self.spec.bits,
            "group_size": self.group_size,
            "symmetric": self.spec.symmetric,
            "damp_ratio": self.damp_ratio,
            "block_size": self.block_size,
            "act_order": self.act_order,
            # only when not the paper's min-max, so tables and bit maps written before the option existed still match
            **({} if self.clip == "minmax" else {"clip": self.clip}),
        }

    def label(self) -> str:
        group = "" if self.group_size is None else f"g{self.group_size}"
        clip = "" if self.clip == "minmax" else "-" + self.clip
        return f"gptq-w{self.spec.bits}{group}{'-sym' if self.spec.symmetric else ''}{'-act' if self.act_order else ''}{clip}"


def gptq_many(quantizers: Sequence[GPTQQuantizer], weight: torch.Tensor, hessian: torch.Tensor) -> list[QuantizedTensor]:
    """``[q.quantize(weight, hessian) for q in quantizers]`` in one column loop.

    GPTQ treats rows independently under the layer's one Hessian, so the copies of the weight, one per quantizer,
    are stacked as rows and share every per-column step; only each copy's grid (bits, symmetry, clipping) differs.
    A profile pricing GPTQ at 2, 3 and 4 bits pays the loop's Python overhead once instead of three times. The
    quantizers must share group size, act order, damping and block size (:attr:`GPTQQuantizer.column_loop`).
    """
    if not quantizers:
        return []
    if len({q.column_loop for q in quantizers}) > 1:
        raise ValueError("gptq_many needs quantizers that differ only in their grids")
    with single_threaded():
        return _gptq_stacked(list(quantizers), weight, hessian)


def _gptq_stacked(quantizers: list[GPTQQuantizer], weight: torch.Tensor, hessian: torch.Tensor) -> list[QuantizedTensor]:
    first = quantizers[0]
    copies = len(quantizers)
    w1 = weight.detach().float().clone()
    rows, cols = w1.shape
    layout = GroupLayout(cols, first.group_size)
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w1[:, dead] = 0
    w = w1.repeat(copies, 1)  # copy k holds rows [k * rows, (k + 1) * rows)
    max_codes = torch.cat([torch.full((rows,), float(q.spec.max_code)) for q in quantizers])
    scales = torch.empty(copies * rows, layout.count)
    zeros = torch.empty(copies * rows, layout.count)
    column_group = layout.column_groups()
    importance = torch.diag(h)

    def fit(group: int, current: torch.Tensor, weights: torch.Tensor) -> None:
        for k, q in enumerate(quantizers):
            part = slice(k * rows, (k + 1) * rows)
            scales[part, group], zeros[part, group] = fit_grid(current[part], q.spec, q.clip, weights)

    if first.act_order:
        for g in range(layout.count):
            start, stop = layout.bounds(g)
            fit(g, w[:, start:stop], importance[start:stop])
        order = torch.argsort(torch.diag(h), descending=True)
    else:
        order = torch.arange(cols)
    w = w[:, order]
    h = h[order][:, order]
    hinv = inverse_hessian_cholesky(h, first.damp_ratio)
    codes = torch.zeros_like(w)
    for block_start in range(0, cols, first.block_size):
        block_stop = min(block_start + first.block_size, cols)
        block = w[:, block_start:block_stop].clone()
        block_err = torch.zeros_like(block)
        block_hinv = hinv[block_start:block_stop, block_start:block_stop]
        for i in range(block_stop - block_start):
            col = block_start + i
            group = int(column_group[order[col]])
            if not first.act_order and col == layout.bounds(group)[0]:
                # Fit the group on its current (already error-compensated) weights.
                stop = layout.bounds(group)[1]
                current = torch.cat([block[:, i:], w[:, block_stop:]], dim=1)[:, : stop - col]
                fit(group, current, importance[col:stop])
            scale, zero = scales[:, group], zeros[:, group]
            column = block[:, i]
            q = torch.minimum(torch.round(column / scale + zero).clamp_min(0), max_codes)  # quantize_codes, per-copy grids
            codes[:, col] = q
            dequant = (q - zero) * scale
            err = (column - dequant) / block_hinv[i, i]
            block[:, i:] -= err[:, None] * block_hinv[i, i:][None, :]
            block_err[:, i] = err
        w[:, block_stop:] -= block_err @ hinv[block_start:block_stop, block_stop:]
    inverse_order = torch.argsort(order)
    codes = codes[:, inverse_order]
    return [
        encode_uniform_grid(codes[k * rows:(k + 1) * rows], scales[k * rows:(k + 1) * rows], zeros[k * rows:(k + 1) * rows], q.spec, layout)
        for k, q in enumerate(quantizers)
    ]
