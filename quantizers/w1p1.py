"""W(1+1) weight binarization (Song et al. 2025, arXiv 2504.05352): one sign bit plus one group bit.

Each weight is ``w ~ sign(w) * alpha_{m}`` where the extra bit ``m in {0, 1}`` picks one of the two
scales of its (row, column group). The paper fits the grouping and the scales by EM on a
Hessian-aware error; here, for the magnitudes ``a_ij = |w_ij|`` of one (row, group) with column
weights ``c_j`` (``diag(H)_j`` for ``weighting="hessian"``, 1 for ``"plain"``):

* E-step: ``m_ij = argmin_m c_j (a_ij - alpha_m)^2`` -- the weight ``c_j`` is common to both
  choices, so this is the nearer scale, ``m_ij = [|a_ij - alpha_1| < |a_ij - alpha_0|]``;
* M-step: ``alpha_m = sum_j c_j a_ij [m_ij = m] / sum_j c_j [m_ij = m]``, the minimizer of the
  weighted squared error ``sum_j c_j (a_ij - alpha_{m_ij})^2``;

i.e. weighted 2-means (Lloyd) on the magnitudes, started from a split at the weighted mean and run
until the assignment stops changing. The activation side of the paper (INT4 activations as four
binary planes) is not part of weight storage and is not implemented here.

With ``error_feedback=True`` (default) the columns are quantized in order with GPTQ's compensation
(:mod:`quantizers.obs`): each group's two scales are fitted by EM on its already-compensated
weights, then every weight takes the sign of its current value and the nearer of the two scales.

Stored form: sign plane + membership plane + two fp16 scales per (row, group):
``2 + 32 / group_size`` bits per weight.
"""

from __future__ import annotations

from typing import Any

import torch

from quantizers.base import GroupLayout, QuantizedTensor, Quantizer, checked_count, checked_damping, checked_flag, checked_group_size
from quantizers.binary_formats import W1P1, decode_w1p1, encode_w1p1, sign_bits, signs_from_bits, to_scale, w1p1_storage_bits
from quantizers.obs import prepare_hessian, quantize_with_error_feedback, without_dead_inputs

WEIGHTINGS = ("hessian", "plain")


def fit_two_scales(
    magnitudes: torch.Tensor, column_weights: torch.Tensor, max_iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 2-means of each row of ``magnitudes`` (rows x m); returns (low, high) scales per row.

    A row whose magnitudes all fall in one cluster gets that cluster's scale twice.
    """
    a = magnitudes.double()
    unweighted = bool((column_weights == 1).all())  # then every c * x below is x: the same sums without the products
    c = column_weights.double().expand_as(a)
    row_mean = (a if unweighted else c * a).sum(1, keepdim=True) / c.sum(1, keepdim=True).clamp_min(1e-300)
    member = a > row_mean

    def refit(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if unweighted:
            weight_hi, weight_lo = member.sum(1).double(), (~member).sum(1).double()
            hi = (a * member).sum(1) / weight_hi.clamp_min(1e-300)
            lo = (a * ~member).sum(1) / weight_lo.clamp_min(1e-300)
        else:
            weight_hi = (c * member).sum(1)
            weight_lo = (c * ~member).sum(1)
            hi = (c * a * member).sum(1) / weight_hi.clamp_min(1e-300)
            lo = (c * a * ~member).sum(1) / weight_lo.clamp_min(1e-300)
        hi = torch.where(weight_hi > 0, hi, lo)
        lo = torch.where(weight_lo > 0, lo, hi)
        return lo, hi

    lo, hi = refit(member)
    for _ in range(max_iterations):
        new_member = (a - hi[:, None]).abs() < (a - lo[:, None]).abs()
        if torch.equal(new_member, member):
            break
        member = new_member
        lo, hi = refit(member)
    return lo.float(), hi.float()


def nearest_scale(values: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Membership bit (1 = ``high``) and quantized value ``sign(v) * alpha_m`` for the nearer scale."""
    a = values.abs()
    member = (a - high).abs() < (a - low).abs()
    return member.to(torch.uint8), signs_from_bits(sign_bits(values)) * torch.where(member, high, low)


class W1P1Quantizer(Quantizer):
    """Sign + one group-selection bit per weight, two EM-fitted scales per (row, group).

    Args:
        group_size: input columns sharing a pair of scales (None: one pair per output row).
        error_feedback: GPTQ-style compensation of each column's error (needs the Hessian).
        weighting: ``"hessian"`` (EM weights ``diag(H)``) or ``"plain"``.
        em_iterations: cap on EM rounds (it usually converges in a handful).
        damp_ratio: GPTQ damping, as a fraction of mean(diag H).
        block_size: lazy-update block when ``group_size`` is None (otherwise blocks are the groups).
    """

    name = "w1p1"
    one_bit = True
    uses_hessian = True

    def __init__(
        self,
        group_size: int | None = 128,
        error_feedback: bool = True,
        weighting: str = "hessian",
        em_iterations: int = 30,
        damp_ratio: float = 0.01,
        block_size: int = 128,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.group_size = checked_group_size(group_size)
        self.error_feedback = checked_flag(error_feedback, "error_feedback")
        self.weighting = weighting
        self.em_iterations = checked_count(em_iterations, "em_iterations", 0)
        self.damp_ratio = checked_damping(damp_ratio)
        self.block_size = checked_count(block_size, "block_size")

    def quantize(self, weight: torch.Tensor, hessian: torch.Tensor | None = None) -> QuantizedTensor:
        if self.needs_hessian() and hessian is None:
            raise ValueError("W(1+1) with error feedback or Hessian weighting needs the layer's input Hessian")
        rows, cols = weight.shape
        layout = GroupLayout(cols, self.group_size)
        if hessian is not None:
            # the inverse Hessian only feeds the error feedback (a Cholesky per layer: most of a plain twin's time)
            w, hinv_cholesky = prepare_hessian(weight, hessian, self.damp_ratio) if self.error_feedback else (without_dead_inputs(weight, hessian), None)
            h_diag = torch.diag(hessian.detach().float()).clamp_min(0)
            h_diag = torch.where(h_diag > 0, h_diag, torch.ones_like(h_diag))
        else:
            w, hinv_cholesky = weight.detach().float(), None
            h_diag = torch.ones(cols)
        column_weights = h_diag if self.weighting == "hessian" else torch.ones(cols)

        scales = torch.zeros(rows, layout.count, 2)
        column_group = layout.column_groups()

        def fit(start: int, stop: int, current: torch.Tensor) -> None:
            group = int(column_group[start])
            low, high = fit_two_scales(current.abs(), column_weights[start:stop], self.em_iterations)
            scales[:, group, 0], scales[:, group, 1] = to_scale(low), to_scale(high)

        if self.group_size is None:
            fit(0, cols, w)  # one pair per row, fitted on the original weights

        members = torch.zeros(rows, cols, dtype=torch.uint8)
        signs = torch.zeros(rows, cols, dtype=torch.uint8)

        def quantize_column(col: int, column: torch.Tensor) -> torch.Tensor:
            group = int(column_group[col])
            members[:, col], q = nearest_scale(column, scales[:, group, 0], scales[:, group, 1])
            signs[:, col] = sign_bits(column)
            return q

        if self.error_feedback:
            assert hinv_cholesky is not None
            block = self.group_size or self.block_size
            fit_block = fit if self.group_size is not None else (lambda start, stop, current: None)
            quantize_with_error_feedback(w, hinv_cholesky, block, fit_block, quantize_column)
        else:
            if self.group_size is not None and cols == layout.count * layout.size:
                # every (row, group) at once: its own 2-means, and a pair whose assignment has settled stays put while
                # the others go on, so this is the group-by-group fit below
                count = layout.count
                magnitudes = w.abs().reshape(rows * count, layout.size)
                low, high = fit_two_scales(magnitudes, column_weights.reshape(count, layout.size).repeat(rows, 1), self.em_iterations)
                scales[:, :, 0], scales[:, :, 1] = to_scale(low).reshape(rows, count), to_scale(high).reshape(rows, count)
            elif self.group_size is not None:
                for g in range(layout.count):
                    start, stop = layout.bounds(g)
                    fit(start, stop, w[:, start:stop])
            # every column at once: each takes its group's two scales (the same per-column rule as quantize_column)
            low, high = scales[:, column_group, 0], scales[:, column_group, 1]
            member, _ = nearest_scale(w, low, high)
            members[:, :] = member
            signs[:, :] = sign_bits(w)

        stored, meta = encode_w1p1(signs, members, scales, layout)
        meta["paper_bpw"] = 2.0  # "W(1+1)": sign + membership bit, scales left out
        qt = QuantizedTensor(W1P1, (rows, cols), stored, meta, dequantized=torch.empty(0))
        qt.dequantized = decode_w1p1(qt.stored, qt.meta, qt.shape)
        return qt

    def needs_hessian(self) -> bool:
        return self.error_feedback or self.weighting == "hessian"

    def storage_bits(self, out_features: int, in_features: int) -> int:
        return w1p1_storage_bits((out_features, in_features), GroupLayout(in_features, self.group_size))

    def settings(self) -> dict[str, Any]:
        return {
            "quantizer": self.name,
            "group_size": self.group_size,
            "error_feedback": self.error_feedback,
            "weighting": self.weighting,
            "em_iterations": self.em_iterations,
            "damp_ratio": self.damp_ratio,
            "block_size": self.block_size,
        }

    def label(self) -> str:
        group = "" if self.group_size is None else f"-g{self.group_size}"
        return f"w1p1{group}{'' if self.error_feedback else '-noef'}{'' if self.weighting == 'hessian' else '-plain'}"
