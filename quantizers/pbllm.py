"""PB-LLM (Shang et al. 2024): partially binarized weights.

A fraction ``salient_fraction`` of the weights -- those with the largest Hessian-aware saliency
``w_ij^2 / [H^-1]_jj`` (the OBS loss of dropping them, :func:`quantizers.obs.obs_saliency`), chosen
once over the whole matrix -- keeps 8 bits; the rest is binarized as ``sign(w) * alpha`` with the
optimal scale ``alpha = mean |w|`` over the binarized weights of the row (or of the row's column
group). Columns are then quantized in order with GPTQ's error compensation (the paper's
GPTQ-based PB-LLM): the binarized weights take the sign of their compensated value, the salient
ones are rounded on their 8-bit grid.

Salient values: ``salient_format="int8"`` stores a symmetric int8 code per salient weight on one
fp16 scale per row (``absmax / 127`` of the row's salient weights, codes clamped to [-127, 127]);
``"fp16"`` stores each salient weight as float16.

Honest bits: which weights are salient must be stored too, as a bitmap of ``numel`` bits or as the
sorted flat indices at ``ceil(log2 numel)`` bits each, whichever is smaller (the bitmap for any
fraction above ``1 / ceil(log2 numel)``). At 10% with int8 that is about 1 (bitmap) + 0.9 (signs) +
0.8 (values) + scales, ~2.8 bits per weight, where the paper counts 1 + 0.1 * 7 = 1.7.
"""

from __future__ import annotations

from typing import Any

import torch

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer, checked_count, checked_damping, checked_group_size
from quantizers.binary_formats import (
    PBLLM,
    decode_pbllm,
    encode_pbllm,
    pbllm_storage_bits,
    sign_bits,
    signs_from_bits,
    to_scale,
)
from quantizers.obs import obs_saliency, prepare_hessian, quantize_with_error_feedback

SALIENT_FORMATS = ("int8", "fp16")
INT8_MAX = 127


def salient_count(out_features: int, in_features: int, fraction: float) -> int:
    """Number of salient weights: ``round(fraction * numel)``."""
    return int(round(fraction * out_features * in_features))


class PBLLMQuantizer(Quantizer):
    """Binarize all but the most salient weights, which keep 8 bits.

    Args:
        salient_fraction: share of weights kept at 8 bits (0-1).
        salient_format: ``"int8"`` (per-row fp16 scale) or ``"fp16"``.
        group_size: input columns sharing one binary scale (None: one scale per row, fitted on the
            original weights; otherwise fitted on each group's compensated weights).
        block_size: GPTQ lazy-update block when ``group_size`` is None (otherwise the groups).
        damp_ratio: GPTQ damping, as a fraction of mean(diag H).
    """

    name = "pbllm"
    one_bit = True
    uses_hessian = True

    def __init__(
        self,
        salient_fraction: float = 0.1,
        salient_format: str = "int8",
        group_size: int | None = None,
        block_size: int = 128,
        damp_ratio: float = 0.01,
    ) -> None:
        if not 0 <= salient_fraction <= 1:
            raise ValueError(f"salient_fraction must be in [0, 1], got {salient_fraction}")
        if salient_format not in SALIENT_FORMATS:
            raise ValueError(f"salient_format must be one of {SALIENT_FORMATS}, got {salient_format!r}")
        self.salient_fraction = salient_fraction
        self.salient_format = salient_format
        self.group_size = checked_group_size(group_size)
        self.block_size = checked_count(block_size, "block_size")
        self.damp_ratio = checked_damping(damp_ratio)

    def select_salient(self, weight: torch.Tensor, hinv_cholesky: torch.Tensor) -> torch.Tensor:
        """Bool mask of the ``round(fraction * numel)`` weights of largest OBS saliency (ties: lower index)."""
        rows, cols = weight.shape
        saliency = obs_saliency(weight, hinv_cholesky).reshape(-1)
        order = torch.argsort(saliency, descending=True, stable=True)
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[order[: salient_count(rows, cols, self.salient_fraction)]] = True
        return mask.reshape(rows, cols)

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        if hessian is None:
            raise ValueError("PB-LLM needs the layer's input Hessian")
        w, hinv_cholesky = prepare_hessian(weight, hessian, self.damp_ratio)
        rows, cols = w.shape
        layout = GroupLayout(cols, self.group_size)
        column_group = layout.column_groups()
        salient = self.select_salient(w, hinv_cholesky)
        int8 = self.salient_format == "int8"

        salient_scales = to_scale((w.abs() * salient).amax(dim=1) / INT8_MAX)
        binary_scales = torch.zeros(rows, layout.count)

        def fit(start: int, stop: int, current: torch.Tensor) -> None:
            keep = ~salient[:, start:stop]
            mean_abs = (current.abs() * keep).sum(1) / keep.sum(1).clamp_min(1)
            binary_scales[:, int(column_group[start])] = to_scale(mean_abs)

        if self.group_size is None:
            fit(0, cols, w)

        signs = torch.zeros(rows, cols, dtype=torch.uint8)
        salient_values = torch.zeros(rows, cols)

        def quantize_column(col: int, column: torch.Tensor) -> torch.Tensor:
            signs[:, col] = sign_bits(column)
            binary = signs_from_bits(signs[:, col]) * binary_scales[:, int(column_group[col])]
            if int8:
                step = torch.where(salient_scales > 0, salient_scales, torch.ones_like(salient_scales))
                code = torch.round(column / step).clamp(-INT8_MAX, INT8_MAX)
                code = torch.where(salient_scales > 0, code, torch.zeros_like(code))
                salient_values[:, col] = code
                high = code * salient_scales
            else:
                high = to_scale(column)
                salient_values[:, col] = high
            return torch.where(salient[:, col], high, binary)

        block = self.group_size or self.block_size
        fit_block = fit if self.group_size is not None else (lambda start, stop, current: None)
        quantize_with_error_feedback(w, hinv_cholesky, block, fit_block, quantize_column)

        stored, meta = encode_pbllm(
            salient, signs, binary_scales, salient_values[salient], salient_scales if int8 else None, layout
        )
        meta["salient_format"] = self.salient_format
        # The paper's count: 1 bit for binarized weights, 8 (or 16) for salient ones; positions and
        # scales left out.
        high_bits = 8 if int8 else 16
        meta["paper_bpw"] = 1 + (high_bits - 1) * int(salient.sum()) / (rows * cols)
        qt = QuantizedTensor(PBLLM, (rows, cols), stored, meta, dequantized=torch.empty(0))
        qt.dequantized = decode_pbllm(qt.stored, qt.meta, qt.shape)
        return qt

    def storage_bits(self, out_features: int, in_features: int) -> int:
        count = salient_count(out_features, in_features, self.salient_fraction)
        layout = GroupLayout(in_features, self.group_size)
        return pbllm_storage_bits((out_features, in_features), count, self.salient_format, layout)

    def settings(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "salient_fraction": self.salient_fraction,
            "salient_format": self.salient_format,
            "group_size": self.group_size,
            "block_size": self.block_size,
            "damp_ratio": self.damp_ratio,
        }

    def label(self) -> str:
        group = "" if self.group_size is None else f"-g{self.group_size}"
        return f"pbllm-s{self.salient_fraction * 100:g}-{self.salient_format}{group}"
