"""Uniform affine grids: ``w ~ (q - z) * s`` with integer codes ``q`` in ``[0, 2^b - 1]``.

Asymmetric grids store the zero point ``z`` as a ``b``-bit code per group; symmetric grids fix
``z = 2^(b-1)`` (GPTQ's convention, so the grid holds an exact zero) and store no zero point; the
1-bit symmetric grid is ``{-s/2, +s/2}`` (``z = 1/2``). Scales are stored as float16 and are rounded
to float16 before use, so the simulated weight equals what the stored form decodes to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16


@dataclass(frozen=True)
class GridSpec:
    bits: int
    symmetric: bool = False

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


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """Nearest codes for ``weight`` (rows x cols) given per-row ``scale``/``zero`` (rows)."""
    q = torch.round(weight.float() / scale[:, None] + zero[:, None])
    return q.clamp(0, spec.max_code)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero[:, None]) * scale[:, None]
