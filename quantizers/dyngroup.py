"""Binary quantization by dynamic grouping (Zheng et al. 2025, arXiv 2509.03054; code WGM_bi_quan).

Sort the magnitudes ``|w|`` of the whole matrix (``structure="matrix"``, the paper's unstructured
grouping) or of each row separately (``structure="row"``), split the sorted sequence into contiguous
segments minimizing ``sum_k |S_k| Var(S_k) + lambda / |S_k|`` (:mod:`quantizers.segmentation`), and
binarize every weight as ``sign(w) * alpha_k`` with ``alpha_k = mean_{S_k} |w|``, the L2-optimal scale
of its segment (``|S| Var(S)`` is exactly that segment's squared binarization error).

Honest bits. The paper's 1.007 bits per weight count the sign bits and the fp16 scales only. But a
segment of the sorted sequence is an arbitrary set of positions: to rebuild the matrix the decoder
must know each weight's segment, so the stored form carries a per-weight group index of
``ceil(log2 G)`` bits (G = number of segments; for ``row``, the largest per-row count, with each row's
count stored beside it). ``meta["paper_bpw"]`` reports the paper's figure (signs + scales only) next
to the honest ``bits_per_weight``. ``structure="row"`` makes the segmentation per row (n =
in_features, small enough for the exact DP, and embarrassingly parallel); its index costs the same
width, and its scales cost ``16 G / in_features`` bits per weight instead of ``16 G / numel``.

``structure="block"`` is the structured variant whose grouping is nearly free: the unit of grouping
is a (row, block of ``block_size`` columns) pair instead of a weight. The units' mean magnitudes are
sorted and segmented the same way, every weight of a unit takes its unit's segment scale, and the
index costs ``ceil(log2 G) / block_size`` bits per weight (4 bits per 128 weights at G = 16) --
about XNOR-g128's layout with its per-group fp16 scale replaced by an index into G shared scales.

``lambda`` is scale-free here: ``lambda = lambda_reg * sum(v^2)`` over the sequence being segmented,
so the same setting behaves alike on matrices of any magnitude (the reference code uses a raw
lambda). With the defaults the ``max_groups`` cap is what binds.

The stored size depends on the data (the number of segments found), so :meth:`storage_bits` returns
the size at ``max_groups`` segments (everywhere), an upper bound; ``QuantizedTensor.storage_bits`` is
exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer
from quantizers.binary_formats import (
    DYNGROUP,
    decode_dyngroup,
    dyngroup_storage_bits,
    encode_dyngroup,
    sign_bits,
    to_scale,
)
from quantizers.segmentation import segment_dp, segment_greedy

METHODS = ("windowed", "greedy", "dp")
STRUCTURES = ("matrix", "row", "block")
MAX_GROUPS = 256
"""Group indices are packed codes of at most 8 bits."""
AUTO_WINDOW_SEGMENTS = 1024
"""``window=None`` starts windowed greedy from about this many segments."""


class DynGroupQuantizer(Quantizer):
    """Sign bit + per-segment scale, segments found on sorted magnitudes.

    Args:
        max_groups: most segments per matrix (``matrix``) or per row (``row``); 1-256.
        lambda_reg: weight of the ``lambda / |S|`` term, relative to ``sum(v^2)``.
        method: ``"windowed"`` (default, fast), ``"greedy"`` (from singletons), or ``"dp"`` (exact,
            sequences up to a few thousand values: use it with ``structure="row"``).
        window: initial segment length for ``"windowed"``; None picks ``max(1, n // 1024)``.
        structure: ``"matrix"`` (one segmentation of all weights), ``"row"`` (one per row) or
            ``"block"`` (one segmentation of the (row, column block) units, see the module doc).
        block_size: columns per unit of ``structure="block"``.
    """

    name = "dyngroup"
    one_bit = True

    def __init__(
        self,
        max_groups: int = 4,
        lambda_reg: float = 0.01,
        method: str = "windowed",
        window: int | None = None,
        structure: str = "matrix",
        block_size: int = 128,
    ) -> None:
        if not 1 <= max_groups <= MAX_GROUPS:
            raise ValueError(f"max_groups must be 1-{MAX_GROUPS}, got {max_groups}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if lambda_reg < 0:
            raise ValueError(f"lambda_reg must be >= 0, got {lambda_reg}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.max_groups = max_groups
        self.lambda_reg = lambda_reg
        self.method = method
        self.window = window
        self.structure = structure
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size

    def segment(self, magnitudes: np.ndarray) -> list[int]:
        """Boundaries ``[0, ..., n]`` of the segmentation of ascending ``magnitudes``."""
        lam = self.lambda_reg * float(np.dot(magnitudes, magnitudes))
        if self.method == "dp":
            return segment_dp(magnitudes, self.max_groups, lam)
        if self.method == "greedy":
            return segment_greedy(magnitudes, self.max_groups, lam, window=1)
        window = self.window or max(1, len(magnitudes) // AUTO_WINDOW_SEGMENTS)
        return segment_greedy(magnitudes, self.max_groups, lam, window=window)

    def _group_sequence(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Group index of every entry of the 1-D ``values`` and the groups' float16-rounded scales."""
        magnitudes = values.abs().double()
        order = torch.argsort(magnitudes, stable=True)
        sorted_mag = magnitudes[order].numpy()
        bounds = self.segment(sorted_mag)
        sizes = torch.tensor(np.diff(bounds))
        in_sorted = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        groups = torch.empty_like(in_sorted)
        groups[order] = in_sorted
        sums = torch.tensor(np.add.reduceat(sorted_mag, bounds[:-1]))
        return groups, to_scale(sums / sizes)

    def _group_units(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``structure="block"``: segment the sorted mean magnitudes of the (row, column block) units;
        a segment's scale is the mean ``|w|`` over all weights of its units (L2-optimal)."""
        layout = GroupLayout(w.shape[1], self.block_size)
        sums = torch.stack([w[:, a:b].abs().double().sum(dim=1) for a, b in map(layout.bounds, range(layout.count))], dim=1)
        sizes = torch.tensor([float(b - a) for a, b in map(layout.bounds, range(layout.count))], dtype=torch.float64)
        unit_groups, _ = self._group_sequence((sums / sizes).reshape(-1))  # units in row-major order
        unit_groups = unit_groups.reshape(sums.shape)
        count = int(unit_groups.max()) + 1
        weight_sums = torch.zeros(count, dtype=torch.float64).index_add_(0, unit_groups.reshape(-1), sums.reshape(-1))
        weight_counts = torch.zeros(count, dtype=torch.float64).index_add_(0, unit_groups.reshape(-1), sizes.expand_as(sums).reshape(-1))
        return unit_groups, to_scale(weight_sums / weight_counts)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        w = weight.detach().float()
        rows, cols = w.shape
        if self.structure == "matrix":
            flat_groups, scales = self._group_sequence(w.reshape(-1))
            groups = flat_groups.reshape(rows, cols)
            counts = [len(scales)]
        elif self.structure == "block":
            groups, scales = self._group_units(w)
            counts = [len(scales)]
        else:
            per_row = [self._group_sequence(w[r]) for r in range(rows)]
            groups = torch.stack([g for g, _ in per_row])
            scales = torch.cat([s for _, s in per_row])
            counts = [len(s) for _, s in per_row]
        block_size = self.block_size if self.structure == "block" else None
        stored, meta = encode_dyngroup(sign_bits(w), groups, scales, counts, self.structure, block_size)
        meta["groups"] = max(counts)
        # What the paper reports: one sign bit per weight plus the fp16 scales, no group index.
        meta["paper_bpw"] = 1 + 16 * len(scales) / (rows * cols)
        qt = QuantizedTensor(DYNGROUP, (rows, cols), stored, meta, dequantized=torch.empty(0))
        qt.dequantized = decode_dyngroup(qt.stored, qt.meta, qt.shape)
        return qt

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Upper bound: the size with ``max_groups`` segments everywhere (the real size is data-dependent)."""
        if self.structure == "row":
            counts = [min(self.max_groups, in_features)] * out_features
        elif self.structure == "block":
            counts = [min(self.max_groups, out_features * GroupLayout(in_features, self.block_size).count)]
        else:
            counts = [min(self.max_groups, out_features * in_features)]
        block_size = self.block_size if self.structure == "block" else None
        return dyngroup_storage_bits((out_features, in_features), counts, self.structure, block_size)

    def settings(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "max_groups": self.max_groups,
            "lambda_reg": self.lambda_reg,
            "method": self.method,
            "window": self.window,
            "structure": self.structure,
            "block_size": self.block_size,
        }

    def label(self) -> str:
        structure = {"matrix": "", "row": "-row", "block": f"-b{self.block_size}"}[self.structure]
        method = "" if self.method == "windowed" else f"-{self.method}"
        return f"dyngroup{structure}-g{self.max_groups}{method}"


__all__ = ["DynGroupQuantizer"]
