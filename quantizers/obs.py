"""GPTQ-style error feedback for any column quantizer (the optimal-brain-surgeon update).

The layer objective is ``||W X - Q X||^2`` with ``H = 2 X X^T / n``. Let ``U`` be the upper
Cholesky factor of the (damped) ``H^-1``. Quantizing column ``j`` to ``q_j`` and spreading its error
``e_j = (w_j - q_j) / U_jj`` over the later columns by ``w_k -= e_j U_jk`` (k > j) is GPTQ's step;
:func:`quantize_with_error_feedback` runs it for a caller-supplied column quantizer, lazily in
blocks as GPTQ does, and lets the caller fit its parameters (scales, masks, ...) on each block's
already-compensated weights before that block is quantized.

The same factor gives the OBS saliency of a weight, the loss of setting it to zero:
``w_ij^2 / U_jj^2``. BiLLM and PB-LLM write it as ``w^2 / [H^-1]_jj^2``; their code divides by the
squared diagonal of the Cholesky factor, i.e. by the sequential ``[H^-1]_jj``, which is what
:func:`obs_saliency` computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from quantizers.base import single_threaded
from quantizers.gptq import inverse_hessian_cholesky

FitBlock = Callable[[int, int, torch.Tensor], None]
"""``fit_block(start, stop, block)``: called once per block with its current (compensated) weights."""
QuantizeColumn = Callable[[int, torch.Tensor], torch.Tensor]
"""``quantize_column(col, column)``: the float value column ``col`` is quantized to (rows,)."""


def prepare_hessian(weight: torch.Tensor, hessian: torch.Tensor, damp_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copy of ``weight`` with dead inputs zeroed, and the upper Cholesky factor of the damped ``H^-1``.

    Inputs that never fire (``H_jj == 0``) cannot affect the output: their weights are set to zero
    and their diagonal to one, as in GPTQ.
    """
    w = without_dead_inputs(weight, hessian)
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    return w, inverse_hessian_cholesky(h, damp_ratio)


def without_dead_inputs(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """float32 copy of ``weight`` with the inputs that never fire (``H_jj == 0``) zeroed."""
    w = weight.detach().float().clone()
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"Hessian of shape {tuple(hessian.shape)} does not match {w.shape[1]} input features")
    w[:, torch.diag(hessian.detach().float()) == 0] = 0
    return w


def obs_saliency(weight: torch.Tensor, hinv_cholesky: torch.Tensor) -> torch.Tensor:
    """``w_ij^2 / U_jj^2``: the OBS loss of zeroing each weight (rows x cols)."""
    return weight.float() ** 2 / torch.diag(hinv_cholesky)[None, :] ** 2


def quantize_with_error_feedback(
    weight: torch.Tensor,
    hinv_cholesky: torch.Tensor,
    block_size: int,
    fit_block: FitBlock,
    quantize_column: QuantizeColumn,
) -> torch.Tensor:
    """Quantize ``weight`` column by column with GPTQ's error compensation; returns the quantized values.

    Args:
        weight: rows x cols float32 (not modified).
        hinv_cholesky: upper Cholesky factor of ``H^-1`` (cols x cols), see :func:`prepare_hessian`.
        block_size: columns per lazy-update block; ``fit_block`` sees exactly these blocks.
        fit_block: fits the quantizer's parameters for columns ``[start, stop)`` on their current
            weights (the errors of all earlier columns already applied).
        quantize_column: maps one current column to its quantized value; may record codes.
    """
    with single_threaded():
        w = weight.float().clone()
        rows, cols = w.shape
        quantized = torch.zeros_like(w)
        u = hinv_cholesky
        for start in range(0, cols, block_size):
            stop = min(start + block_size, cols)
            block = w[:, start:stop].clone()
            fit_block(start, stop, block.clone())
            errors = torch.zeros_like(block)
            for i in range(stop - start):
                col = start + i
                column = block[:, i]
                q = quantize_column(col, column.clone())
                quantized[:, col] = q
                err = (column - q) / u[col, col]
                block[:, i:] -= err[:, None] * u[col, col:stop][None, :]
                errors[:, i] = err
            w[:, stop:] -= errors @ u[start:stop, stop:]
        return quantized
