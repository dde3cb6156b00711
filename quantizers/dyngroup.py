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

from quantizers.base import QuantizedTensor, Quantizer
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
STRUCTURES = ("matrix", "row")
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
        structure: ``"matrix"`` (one segmentation of all weights) or ``"row"`` (one per row).
    """

    name = "dyngroup"

    def __init__(
        self,
        max_groups: int = 4,
        lambda_reg: float = 0.01,
        method: str = "windowed",
        window: int | None = None,
        structure: str = "matrix",
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

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        w = weight.detach().float()
        rows, cols = w.shape
        if self.structure == "matrix":
            flat_groups, scales = self._group_sequence(w.reshape(-1))
            groups = flat_groups.reshape(rows, cols)
            counts = [len(scales)]
        else:
            per_row = [self._group_sequence(w[r]) for r in range(rows)]
            groups = torch.stack([g for g, _ in per_row])
            scales = torch.cat([s for _, s in per_row])
            counts = [len(s) for _, s in per_row]
        stored, meta = encode_dyngroup(sign_bits(w), groups, scales, counts, self.structure)
        meta["groups"] = max(counts)
        # What the paper reports: one sign bit per weight plus the fp16 scales, no group index.
        meta["paper_bpw"] = 1 + 16 * len(scales) / (rows * cols)
        qt = QuantizedTensor(DYNGROUP, (rows, cols), stored, meta, dequantized=torch.empty(0))
        qt.dequantized = decode_dyngroup(qt.stored, qt.meta, qt.shape)
        return qt

    def storage_bits(self, out_features: int, in_features: int) -> int:
        """Upper bound: the size with ``max_groups`` segments everywhere (the real size is data-dependent)."""
        per_sequence = min(self.max_groups, in_features if self.structure == "row" else out_features * in_features)
        counts = [per_sequence] if self.structure == "matrix" else [per_sequence] * out_features
        return dyngroup_storage_bits((out_features, in_features), counts, self.structure)

    def settings(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "max_groups": self.max_groups,
            "lambda_reg": self.lambda_reg,
            "method": self.method,
            "window": self.window,
            "structure": self.structure,
        }

    def label(self) -> str:
        structure = "" if self.structure == "matrix" else "-row"
        method = "" if self.method == "windowed" else f"-{self.method}"
        return f"dyngroup{structure}-g{self.max_groups}{method}"


__all__ = ["DynGroupQuantizer"]
