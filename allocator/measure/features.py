"""The per-layer feature vector: what the allocation policy (the RL env) observes of each linear layer.

Features must mean the same thing on models of any size and family, so every one is scale-free
(a ratio, a share, a log of a ratio) or normalized within the model. They come from the layer's
weight and its calibration statistics (:class:`allocator.model.calibration.InputStatistics`) in two steps:
:func:`measure_layer` takes the raw, per-layer measurements (:class:`LayerMeasurements`, small and
JSON-able, so a resumed profile keeps them), and :func:`feature_matrix` turns the measurements of
all layers of one model into the L x F matrix, doing the within-model normalizations.

Features (:data:`FEATURE_NAMES`, in order; ``log`` is the natural log, ``eps = 1e-12`` guards it;
``H = 2 X^T X / n`` is the input Hessian, so ``diag(H) / 2`` is each input channel's mean square):

- ``relative_depth``: block index / (blocks - 1), in [0, 1] (0 for a one-block model).
- ``kind_q``, ``kind_k``, ``kind_v``, ``kind_o``, ``kind_gate``, ``kind_up``, ``kind_down``: module
  kind one-hot, from the last name component (``q_proj``, ``wq``, ``query``, ...; a fused
  ``qkv_proj`` sets q, k and v, ``gate_up_proj`` gate and up); all zero for an unknown kind.
- ``log_param_share``: ``log(L * numel / total numel)``: 0 for a layer of average size.
- ``log_fan_ratio``: ``log(in_features / out_features)``.
- ``weight_log_kurtosis``: ``log(E[(w - mean)^4] / var^2)`` over all weights (log 3 = 1.10 for a
  Gaussian).
- ``weight_log_max_over_std``: ``log(max |w - mean| / std)``.
- ``act_log_rms``: ``log(input RMS)`` minus its mean over the model's layers (input RMS =
  ``sqrt(mean_j diag(H)_j / 2)``, per element).
- ``act_log_outlier_ratio``: ``log(max |x| / input RMS)`` over all calibration tokens and channels.
- ``act_log_channel_spread``: ``log(max_j rms_j / median_j rms_j)`` of the per-channel input RMS.
- ``log_hessian_trace_share``: ``log(L * tr(H) / sum over layers of tr(H))``.
- ``rtn_w2_error``, ``rtn_w4_error``: ``||W - Q||_F / ||W||_F`` for asymmetric RTN at 2 and 4 bits,
  group size 128 (:data:`RTN_GROUP_SIZE`), in [0, 1] for any sensible weight.
- ``rtn_w2_output_error``: ``tr(E H E^T) / tr(W H W^T)`` with ``E = W - Q`` of RTN 2-bit: the relative
  output error of the layer on its calibration inputs.

:func:`measure_weight` measures a layer from its weight alone (no calibration forward): the
:data:`ACTIVATION_FEATURES` (the activation statistics, the Hessian trace share and the output error) are then NaN.

Bump :data:`FEATURE_SCHEMA` whenever a feature or its normalization changes: a policy file records
the schema it was trained on and refuses a mismatched one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from allocator.model.arch import module_kinds
from quantizers import RTNQuantizer

FEATURE_SCHEMA = "bitalloc-features-v1"

MODULE_KINDS = ("q", "k", "v", "o", "gate", "up", "down")

FEATURE_NAMES: tuple[str, ...] = (
    "relative_depth",
    *(f"kind_{kind}" for kind in MODULE_KINDS),
    "log_param_share",
    "log_fan_ratio",
    "weight_log_kurtosis",
    "weight_log_max_over_std",
    "act_log_rms",
    "act_log_outlier_ratio",
    "act_log_channel_spread",
    "log_hessian_trace_share",
    "rtn_w2_error",
    "rtn_w4_error",
    "rtn_w2_output_error",
)
"""Column names of :func:`feature_matrix` (documented one per line in the module docstring)."""


ACTIVATION_FEATURES: tuple[str, ...] = (
    "act_log_rms",
    "act_log_outlier_ratio",
    "act_log_channel_spread",
    "log_hessian_trace_share",
    "rtn_w2_output_error",
)
"""The features that need the layer's calibration inputs (:func:`measure_layer`); :func:`measure_weight` leaves them NaN."""

RTN_GROUP_SIZE = 128
EPS = 1e-12


def _log(value: float) -> float:
    return math.nan if math.isnan(value) else math.log(max(value, EPS))


@dataclass(frozen=True)
class LayerMeasurements:
    """Raw per-layer quantities :func:`feature_matrix` normalizes (JSON-able, see :meth:`as_dict`)."""

    name: str
    block: int
    num_blocks: int
    out_features: int
    in_features: int
    weight_kurtosis: float
    weight_max_over_std: float
    act_rms: float
    """Per-element RMS of the layer's inputs."""
    act_outlier_ratio: float
    """max |x| / RMS over every calibration token and channel."""
    act_channel_spread: float
    """max / median of the per-channel input RMS."""
    hessian_trace: float
    rtn2_error: float
    rtn4_error: float
    rtn2_output_error: float

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerMeasurements:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _relative_error(weight: torch.Tensor, quantized: torch.Tensor) -> float:
    """``||E||_F / ||W||_F`` with ``E = W - Q``, in float64."""
    w = weight.double()
    return float((w - quantized.double()).norm()) / max(float(w.norm()), EPS)


def _relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(E H E^T) / tr(W H W^T)`` with ``E = W - Q``, in float64."""
    w = weight.double()
    error = w - quantized.double()
    h = hessian.double()
    output_weight = float(((w @ h) * w).sum())
    output_error = float(((error @ h) * error).sum())
    return output_error / max(output_weight, EPS)


@torch.inference_mode()
def measure_layer(
    name: str,
    weight: torch.Tensor,
    hessian: torch.Tensor,
    act_absmax: torch.Tensor,
    block: int,
    num_blocks: int,
) -> LayerMeasurements:
    """Measure one linear layer: ``weight`` (out x in), its input ``hessian`` (``2 X^T X / n``) and the
    per-channel max ``|x|`` of its calibration inputs."""
    rtn2_weight = RTNQuantizer(2, RTN_GROUP_SIZE).quantize(weight).dequantized
    channel_ms = torch.diag(hessian.double()).clamp_min(0) / 2  # mean x_j^2 per input channel
    act_rms = math.sqrt(float(channel_ms.mean()))
    channel_rms = channel_ms.sqrt()
    median = float(channel_rms.median())
    return replace(
        _weight_measurements(name, weight, rtn2_weight, block, num_blocks),
        act_rms=act_rms,
        act_outlier_ratio=float(act_absmax.max()) / act_rms if act_rms > 0 else 0.0,
        act_channel_spread=float(channel_rms.max()) / median if median > 0 else 0.0,
        hessian_trace=float(torch.diag(hessian.double()).sum()),
        rtn2_output_error=_relative_output_error(weight, rtn2_weight, hessian),
    )


@torch.inference_mode()
def measure_weight(name: str, weight: torch.Tensor, block: int, num_blocks: int) -> LayerMeasurements:
    """What :func:`measure_layer` measures of ``weight`` alone, without calibration inputs: the measurements behind
    :data:`ACTIVATION_FEATURES` are NaN (and so are those features in :func:`feature_matrix`)."""
    return _weight_measurements(name, weight, RTNQuantizer(2, RTN_GROUP_SIZE).quantize(weight).dequantized, block, num_blocks)


def _weight_measurements(name: str, weight: torch.Tensor, rtn2_weight: torch.Tensor, block: int, num_blocks: int) -> LayerMeasurements:
    """The weight's own measurements; the activation ones NaN."""
    w = weight.detach().double()
    out_features, in_features = w.shape
    centered = w - w.mean()
    variance = float((centered**2).mean())
    std = math.sqrt(variance)
    kurtosis = float((centered**4).mean()) / max(variance**2, EPS**2) if variance > 0 else 0.0
    max_over_std = float(centered.abs().max()) / std if std > 0 else 0.0
    return LayerMeasurements(
        name=name,
        block=block,
        num_blocks=num_blocks,
        out_features=out_features,
        in_features=in_features,
        weight_kurtosis=kurtosis,
        weight_max_over_std=max_over_std,
        act_rms=math.nan,
        act_outlier_ratio=math.nan,
        act_channel_spread=math.nan,
        hessian_trace=math.nan,
        rtn2_error=_relative_error(weight, rtn2_weight),
        rtn4_error=_relative_error(weight, RTNQuantizer(4, RTN_GROUP_SIZE).quantize(weight).dequantized),
        rtn2_output_error=math.nan,
    )


def feature_matrix(measurements: Sequence[LayerMeasurements]) -> np.ndarray:
    """The L x F float32 feature matrix of one model's layers (columns: :data:`FEATURE_NAMES`)."""
    count = len(measurements)
    if count == 0:
        return np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32)
    total_numel = sum(m.numel for m in measurements)
    total_trace = sum(m.hessian_trace for m in measurements)
    log_rms = np.array([_log(m.act_rms) for m in measurements])
    mean_log_rms = float(log_rms.mean())
    rows = []
    for m, layer_log_rms in zip(measurements, log_rms):
        kinds = module_kinds(m.name)
        rows.append(
            [
                m.block / (m.num_blocks - 1) if m.num_blocks > 1 else 0.0,
                *(1.0 if kind in kinds else 0.0 for kind in MODULE_KINDS),
                _log(count * m.numel / total_numel),
                math.log(m.in_features / m.out_features),
                _log(m.weight_kurtosis),
                _log(m.weight_max_over_std),
                layer_log_rms - mean_log_rms,
                _log(m.act_outlier_ratio),
                _log(m.act_channel_spread),
                _log(count * m.hessian_trace / total_trace) if total_trace > 0 or math.isnan(total_trace) else 0.0,
                m.rtn2_error,
                m.rtn4_error,
                m.rtn2_output_error,
            ]
        )
    out = np.asarray(rows, dtype=np.float32)
    assert out.shape[1] == len(FEATURE_NAMES)
    return out
