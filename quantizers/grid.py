"""Uniform affine grids: ``w ~ (q - z) * s`` with integer codes ``q`` in ``[0, 2^b - 1]``.

Asymmetric grids store the zero point ``z`` as a ``b``-bit code per group; symmetric grids fix
``z = 2^(b-1)`` (GPTQ's convention, so the grid holds an exact zero) and store no zero point; the
1-bit symmetric grid is ``{-s/2, +s/2}`` (``z = 1/2``). Scales are stored as float16 and are rounded
to float16 before use, so the simulated weight equals what the stored form decodes to.

Two ways to fit a group's grid (``CLIP_METHODS``): ``minmax`` covers each row's range; ``mse`` shrinks
the range towards zero by the factor (searched on a fixed grid, per row) that minimizes the squared
rounding error, weighted per column by an importance such as diag(H). Clipping a few outliers buys a
finer step for every other weight, which matters most at 2-3 bits (GPTQ's reference code has the same
search as an option; llama.cpp's k-quants search their scales in the same spirit).
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from quantizers.packing import MAX_CODE_BITS

SCALE_DTYPE = torch.float16
CLIP_METHODS = ("minmax", "mse")
MSE_SHRINK_STEPS = 32
"""Shrink factors tried by the ``mse`` fit: 1, 1 - 1/64, ..., 1 - 31/64 (down to about half the range)."""


@dataclass(frozen=True)
class GridSpec:
    bits: int
    symmetric: bool = False

    def __post_init__(self) -> None:
        # settings come from JSON files too: 0, 99, 3.5 or "4" bits must fail here, not mid-quantization
        if isinstance(self.bits, bool) or not isinstance(self.bits, Integral) or not 1 <= self.bits <= MAX_CODE_BITS:
            raise ValueError(f"bits must be an integer from 1 to {MAX_CODE_BITS}, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be true or false, got {self.symmetric!r}")

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    def symmetric_zero(self) -> float:
        return 0.5 if self.bits == 1 else float(1 << (self.bits - 1))


def fit_minmax(weight: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point covering each row's [min, max] (rows x cols -> rows)."""
    w = weight.float()
    wmin = torch.minimum(w.min(dim=1).values, torch.zeros(()))
    wmax = torch.maximum(w.max(dim=1).values, torch.zeros(()))
    if spec.symmetric:
        absmax = torch.maximum(wmin.abs(), wmax)
        if spec.bits == 1:
            # Levels (q - 1/2) * s = +-s/2; s/2 = mean |w| is the L2-optimal binary scale.
            scale = 2 * w.abs().mean(dim=1)
        else:
            scale = 2 * absmax / spec.max_code
    else:
        scale = (wmax - wmin) / spec.max_code
    # An all-zero row still needs a positive, float16-representable scale.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.to(SCALE_DTYPE).float().clamp_min(torch.finfo(SCALE_DTYPE).smallest_normal)
    if spec.symmetric:
        zero = torch.full_like(scale, spec.symmetric_zero())
    else:
        zero = torch.round(-wmin / scale).clamp(0, spec.max_code)
    return scale, zero


def fit_clipped(weight: torch.Tensor, spec: GridSpec, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point minimizing sum_j importance_j (w_ij - q_ij)^2 over shrunk ranges.

    The factor ``p`` scales the row's [min, max] (or its absolute maximum, for symmetric grids); ``p = 1``
    is :func:`fit_minmax`, so the result is never worse than it on the weighted error. The 1-bit symmetric
    grid is already L2-optimal and is returned as fitted by min-max.
    """
    w = weight.float()
    best_scale, best_zero = fit_minmax(w, spec)
    if spec.symmetric and spec.bits == 1:
        return best_scale, best_zero
    weights = torch.ones(w.shape[1]) if importance is None else importance.float().clamp_min(0)
    best_err = _weighted_error(w, best_scale, best_zero, spec, weights)
    for step in range(1, MSE_SHRINK_STEPS):
        shrink = 1 - step / (2 * MSE_SHRINK_STEPS)
        scale, zero = fit_minmax(w * shrink, spec)  # the range of the shrunk row, applied to the row itself
        err = _weighted_error(w, scale, zero, spec, weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def fit_grid(weight: torch.Tensor, spec: GridSpec, clip: str, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point by the named method (one of :data:`CLIP_METHODS`)."""
    if clip == "minmax":
        return fit_minmax(weight, spec)
    if clip == "mse":
        return fit_clipped(weight, spec, importance)
    raise ValueError(f"unknown clip method {clip!r}; choose from {', '.join(CLIP_METHODS)}")


def _weighted_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: GridSpec, weights: torch.Tensor) -> torch.Tensor:
    deq = dequantize_codes(quantize_codes(w, scale, zero, spec), scale, zero)
    return ((w - deq) ** 2) @ weights


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Nearest codes for ``weight`` (rows x cols) given per-row ``scale``/``zero`` (rows)."""
    q = torch.round(weight.float() / scale[:, None] + zero[:, None])
    return q.clamp(0, spec.max_code)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero[:, None]) * scale[:, None]
