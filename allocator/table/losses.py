"""Loss names: the columns a sensitivity table can hold, and which one solvers prefer.

Each loss is an L x O matrix of predicted damage per (layer, option); solvers minimize its sum.
Who makes each: :mod:`allocator.measure.profile` (``hessian_err``, ``weight_err``, ``kl``),
:mod:`allocator.measure.layer_kl` (``kl_est``, ``kl_local``) and :mod:`allocator.measure.fisher_losses` (``fisher``,
``fisher_emp``) and :mod:`allocator.measure.features_pass` (``fisher_twin``, with ``weight_err`` and its own).
"""

from __future__ import annotations

HESSIAN_ERR = "hessian_err"
"""tr((W-Q) H (W-Q)^T) of the layer quantized alone, in that layer's own output units."""
WEIGHT_ERR = "weight_err"
"""||W-Q||_F^2."""
KL = "kl"
"""Measured mean per-token KL(reference || model) with only this layer quantized."""
KL_MEASURED = KL
KL_CALIBRATED = "kl_est"
"""Each layer's hessian_err times that layer's measured KL gain (one anchor option prices all)."""
KL_LOCAL = "kl_local"
"""Single-layer KL re-measured around a whole allocation (every other layer at its base option)."""
FISHER = "fisher"
"""½ Σ F ⊙ (W − Q)² with F the diagonal Fisher of the model's own predictive distribution (labels sampled
from the reference): the second-order estimate of ``kl`` from one gradient pass."""
FISHER_EMPIRICAL = "fisher_emp"
"""As ``fisher`` with the empirical Fisher (squared gradient of the text's NLL)."""
FISHER_TWIN = "fisher_twin"
"""½ Σ F ⊙ (W − Q)² of each option's calibration-free twin (the features pass with a Fisher input): what a loss
model (policies/loss_model.py) reads of a new model, with no quantized forward."""

PREFERRED_LOSSES = (KL, KL_CALIBRATED)
"""Measured single-layer KL first (allocator/measure/layer_kl.py): it predicts measured quality of whole
allocations far better than the Hessian-weighted output error (benchmarks/results/allocation.md)."""
