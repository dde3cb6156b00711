"""BiLLM (Huang et al. 2024): residual binarization of salient columns, split binarization of the rest.

Per block of ``block_size`` input columns (on the block's weights after the GPTQ updates of all
earlier blocks), with ``U`` the upper Cholesky factor of ``H^-1`` and column weights
``c_j = 1 / U_jj^2``:

1. **Salient columns.** Column saliency ``s_j = sum_i w_ij^2 / [H^-1]_jj`` (the paper's
   ``w^2 / [H^-1]_jj^2`` summed over the column, with the reference code's Cholesky diagonal, see
   :mod:`quantizers.obs`). The ``k`` most salient columns get order-2 residual binarization,
   per row: ``alpha_1 = mean |w|``, ``b_1 = sign(w)``; ``r = w - alpha_1 b_1``,
   ``alpha_2 = mean |r|``, ``b_2 = sign(r)``; ``w ~ alpha_1 b_1 + alpha_2 b_2``.
2. **Break-point split of the others.** A magnitude break-point ``p`` splits the remaining weights
   into a concentrated group ``|w| <= p`` and a sparse group ``|w| > p``, each binarized per row
   with its own ``alpha = mean |w|`` (paper eq. 9-10).
3. **Search.** ``k`` (0 .. ``max_salient_columns``, or fixed by ``salient_columns``) and ``p`` (the
   ``breakpoint_candidates`` quantiles 10%..90% of the non-salient ``|w|``) minimize the block's
   column-weighted error ``sum_ij c_j (w_ij - q_ij)^2``. For every ``k`` the best ``p`` is found
   from per-row sorted prefix sums (exact over the candidate grid); ``k`` is searched coarse to
   fine (``search_step``; 1 makes the joint search exact).
4. **Error compensation.** The block's columns are quantized in order with GPTQ's updates inside
   the block and across blocks (:mod:`quantizers.obs`); the scales, the salient columns and ``p``
   stay as fitted, each weight's bits are taken from its compensated value. (The reference code
   quantizes a whole block at once and compensates only the later blocks.)

Scales are plain means of ``|w|`` as in the paper; the reference code also subtracts a per-row mean
before each binarization, which would store 4 more fp16 values per (row, block); not done here.

Stored form (counted in full, :func:`quantizers.binary_formats.billm_storage_bits`): a sign plane,
a second plane (the residual sign in salient columns, the break-point group bit elsewhere), a
salient-column bitmap (``in_features`` bits), and 4 fp16 scales per (row, block). Every weight
therefore costs 2 bits plus ``64 / block_size`` bits of scales -- ~2.5 bits per weight at
``block_size=128``, where the paper reports ~1.1 by leaving out the group bitmap and the scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from quantizers.base import QuantizedTensor, Quantizer
from quantizers.binary_formats import (
    BILLM,
    billm_storage_bits,
    decode_billm,
    encode_billm,
    sign_bits,
    signs_from_bits,
    to_scale,
)
from quantizers.obs import prepare_hessian, quantize_with_error_feedback

QUANTILE_RANGE = (0.1, 0.9)


@dataclass
class BlockFit:
    """The fitted structure of one block: salient columns, break-point and per-row scales."""

    salient: torch.Tensor  # bool, block columns
    breakpoint: float
    scales: torch.Tensor  # rows x 4: alpha_1, alpha_2 (salient), concentrated, sparse
    error: float  # column-weighted squared error of the block before compensation


def residual_scales(magnitudes: torch.Tensor, column_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Order-2 residual binarization of each row of ``magnitudes`` (rows x k): (alpha_1, alpha_2, error).

    On magnitudes ``a = |w|``: ``r = w - alpha_1 sign(w) = sign(w) (a - alpha_1)``, so
    ``alpha_2 = mean |a - alpha_1|`` and the remaining error is ``sum c (|a - alpha_1| - alpha_2)^2``.
    """
    rows, k = magnitudes.shape
    if k == 0:
        zeros = torch.zeros(rows, dtype=torch.float64)
        return zeros, zeros, 0.0
    a = magnitudes.double()
    alpha_1 = a.mean(dim=1)
    residual = (a - alpha_1[:, None]).abs()
    alpha_2 = residual.mean(dim=1)
    error = (column_weights.double()[None, :] * (residual - alpha_2[:, None]) ** 2).sum()
    return alpha_1, alpha_2, float(error)


def breakpoint_search(
    sorted_magnitudes: torch.Tensor, sorted_weights: torch.Tensor, keep: torch.Tensor, candidates: int
) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """Best break-point for the kept entries of each row: (p, alpha_conc, alpha_sparse, error).

    ``sorted_magnitudes`` (rows x m) holds each row's ``|w|`` sorted ascending, ``sorted_weights``
    the matching column weights ``c``, ``keep`` which entries take part (the non-salient ones).
    Candidates are the quantiles 10%..90% of the kept magnitudes. For a break-point ``p`` a row's
    concentrated group is its kept entries ``a <= p`` with scale ``alpha_c = mean(a)`` over them, the
    sparse group the rest; the error ``sum c (a - alpha)^2 = C2 - 2 alpha C1 + alpha^2 C0`` comes
    from prefix sums of ``[kept]``, ``a``, ``c``, ``c a``, ``c a^2`` along the sorted rows, for all
    candidates at once.
    """
    rows = sorted_magnitudes.shape[0]
    kept = keep.double()
    if not keep.any():
        zeros = torch.zeros(rows, dtype=torch.float64)
        return 0.0, zeros, zeros, 0.0
    a = sorted_magnitudes.double()
    levels = np.linspace(*QUANTILE_RANGE, candidates)
    # numpy's selection-based quantile (same linear interpolation as torch.quantile, no full sort).
    points = torch.from_numpy(np.quantile(a[keep].numpy(), levels))
    c = sorted_weights.double() * kept

    def prefix(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(torch.cumsum(x, dim=1), (1, 0))

    n, s1, c0, c1, c2 = prefix(kept), prefix(kept * a), prefix(c), prefix(c * a), prefix(c * a**2)
    position = torch.searchsorted(a, points.expand(rows, candidates).contiguous(), right=True)  # rows x P

    def split(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = torch.gather(table, 1, position)
        return low, table[:, -1:] - low

    (n_lo, n_hi), (s1_lo, s1_hi), (c0_lo, c0_hi), (c1_lo, c1_hi), (c2_lo, c2_hi) = map(split, (n, s1, c0, c1, c2))
    alpha_lo = torch.where(n_lo > 0, s1_lo / n_lo.clamp_min(1), torch.zeros_like(s1_lo))
    alpha_hi = torch.where(n_hi > 0, s1_hi / n_hi.clamp_min(1), torch.zeros_like(s1_hi))
    error = (c2_lo - 2 * alpha_lo * c1_lo + alpha_lo**2 * c0_lo) + (c2_hi - 2 * alpha_hi * c1_hi + alpha_hi**2 * c0_hi)
    totals = error.clamp_min(0).sum(dim=0)
    best = int(torch.argmin(totals))
    return float(points[best]), alpha_lo[:, best], alpha_hi[:, best], float(totals[best])


class BiLLMQuantizer(Quantizer):
    """BiLLM with block-wise GPTQ compensation and fully counted storage.

    Args:
        block_size: columns per block (salient-column choice, break-point and scales are per block).
        salient_columns: fixed number of salient columns per block (None: searched).
        max_salient_columns: upper end of the search (the reference code searches up to 50).
        search_step: the search tries every ``search_step``-th count, then every count within one
            step of the best (1: every count, exact over the grid; 5: ~3x fewer fits).
        breakpoint_candidates: quantiles of ``|w|`` tried as break-points.
        damp_ratio: GPTQ damping, as a fraction of mean(diag H).
    """

    name = "billm"
    one_bit = True
    uses_hessian = True

    def __init__(
        self,
        block_size: int = 128,
        salient_columns: int | None = None,
        max_salient_columns: int = 50,
        breakpoint_candidates: int = 81,
        damp_ratio: float = 0.01,
        search_step: int = 5,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if salient_columns is not None and salient_columns < 0:
            raise ValueError(f"salient_columns must be >= 0 or None, got {salient_columns}")
        if breakpoint_candidates < 1:
            raise ValueError(f"breakpoint_candidates must be >= 1, got {breakpoint_candidates}")
        self.block_size = block_size
        self.salient_columns = salient_columns
        self.max_salient_columns = max_salient_columns
        self.breakpoint_candidates = breakpoint_candidates
        self.damp_ratio = damp_ratio
        if search_step < 1:
            raise ValueError(f"search_step must be positive, got {search_step}")
        self.search_step = search_step

    def fit_block(self, block: torch.Tensor, column_weights: torch.Tensor) -> BlockFit:
        """Search the salient-column count and the break-point of one block (rows x cols)."""
        rows, cols = block.shape
        a = block.abs().double()
        c = column_weights.double()
        saliency = (a**2).sum(dim=0) * c
        order = torch.argsort(saliency, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(cols)
        # Each row sorted once; a salient-column count k only changes which entries are kept.
        sorted_a, by_magnitude = torch.sort(a, dim=1, stable=True)
        sorted_c, sorted_rank = c[by_magnitude], rank[by_magnitude]
        fits: dict[int, BlockFit] = {}

        def fit_count(k: int) -> BlockFit:
            if k not in fits:
                fits[k] = self._fit_count(k, order, a, c, sorted_a, sorted_c, sorted_rank)
            return fits[k]

        if self.salient_columns is not None:
            return fit_count(min(self.salient_columns, cols))
        # Coarse-to-fine over k: every ``search_step``-th count, then every count around the best.
        top_count = min(self.max_salient_columns, cols)
        coarse = min(range(0, top_count + 1, self.search_step), key=lambda k: fit_count(k).error)
        fine = range(max(coarse - self.search_step + 1, 0), min(coarse + self.search_step, top_count + 1))
        return min((fit_count(k) for k in fine), key=lambda f: f.error)

    def _fit_count(
        self,
        k: int,
        order: torch.Tensor,
        a: torch.Tensor,
        c: torch.Tensor,
        sorted_a: torch.Tensor,
        sorted_c: torch.Tensor,
        sorted_rank: torch.Tensor,
    ) -> BlockFit:
        """The fit with the ``k`` most salient columns residual-binarized."""
        cols = a.shape[1]
        top = order[:k]
        alpha_1, alpha_2, error_salient = residual_scales(a[:, top], c[top])
        rest = sorted_rank >= k
        point, alpha_c, alpha_s, error_rest = breakpoint_search(sorted_a, sorted_c, rest, self.breakpoint_candidates)
        salient = torch.zeros(cols, dtype=torch.bool)
        salient[top] = True
        scales = torch.stack([alpha_1, alpha_2, alpha_c, alpha_s], dim=1)
        return BlockFit(salient, point, to_scale(scales), error_salient + error_rest)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        if hessian is None:
            raise ValueError("BiLLM needs the layer's input Hessian")
        w, hinv_cholesky = prepare_hessian(weight, hessian, self.damp_ratio)
        rows, cols = w.shape
        column_weights = 1 / torch.diag(hinv_cholesky).double() ** 2
        blocks = -(-cols // self.block_size)
        scales = torch.zeros(rows, blocks, 4)
        salient = torch.zeros(cols, dtype=torch.bool)
        breakpoints = torch.zeros(blocks, dtype=torch.float64)
        signs = torch.zeros(rows, cols, dtype=torch.uint8)
        second = torch.zeros(rows, cols, dtype=torch.uint8)

        def fit(start: int, stop: int, current: torch.Tensor) -> None:
            block_fit = self.fit_block(current, column_weights[start:stop])
            index = start // self.block_size
            scales[:, index] = block_fit.scales
            salient[start:stop] = block_fit.salient
            breakpoints[index] = block_fit.breakpoint

        def quantize_column(col: int, column: torch.Tensor) -> torch.Tensor:
            index = col // self.block_size
            alpha = scales[:, index]
            signs[:, col] = sign_bits(column)
            first = signs_from_bits(signs[:, col])
            if salient[col]:
                residual = column - first * alpha[:, 0]
                second[:, col] = sign_bits(residual)
                return first * alpha[:, 0] + signs_from_bits(second[:, col]) * alpha[:, 1]
            sparse = column.abs().double() > breakpoints[index]
            second[:, col] = sparse.to(torch.uint8)
            return first * torch.where(sparse, alpha[:, 3], alpha[:, 2])

        quantize_with_error_feedback(w, hinv_cholesky, self.block_size, fit, quantize_column)

        stored, meta = encode_billm(signs, second, salient, scales, self.block_size)
        meta["salient_columns"] = int(salient.sum())
        # The paper's count: one bit per weight plus the residual plane of the salient columns
        # (it leaves out the break-point group bit, the salient bitmap and the scales).
        meta["paper_bpw"] = 1 + int(salient.sum()) / cols
        qt = QuantizedTensor(BILLM, (rows, cols), stored, meta, dequantized=torch.empty(0))
        qt.dequantized = decode_billm(qt.stored, qt.meta, qt.shape)
        return qt

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return billm_storage_bits((out_features, in_features), self.block_size)

    def settings(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "block_size": self.block_size,
            "salient_columns": self.salient_columns,
            "max_salient_columns": self.max_salient_columns,
            "breakpoint_candidates": self.breakpoint_candidates,
            "damp_ratio": self.damp_ratio,
            "search_step": self.search_step,
        }

    def label(self) -> str:
        salient = "" if self.salient_columns is None else f"-s{self.salient_columns}"
        return f"billm-b{self.block_size}{salient}"
