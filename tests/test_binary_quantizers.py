"""The 1-bit family (XNOR, BiLLM, PB-LLM, dynamic grouping, W(1+1)) on a small synthetic layer.

Every configuration is quantized once per session (and once more for the determinism check) on a
64 x 256 weight with per-row scale spread and injected outliers, and a Hessian ``2 X^T X / n`` of
correlated, unevenly scaled inputs.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

from quantizers import QUANTIZERS, QuantizedTensor, Quantizer, build_quantizer, decode
from quantizers.binary_formats import dyngroup_storage_bits, index_bits, pack_wide, unpack_wide
from quantizers.dyngroup import DynGroupQuantizer
from quantizers.packing import unpack_codes
from quantizers.segmentation import segment_dp, segment_greedy, segmentation_objective
from quantizers.w1p1 import fit_two_scales

ROWS, COLS = 64, 256

# (name, settings, expected bits per weight range)
CONFIGS: list[tuple[str, dict[str, Any], tuple[float, float]]] = [
    ("xnor", {}, (1 + 16 / COLS, 1 + 16 / COLS)),
    ("xnor", {"group_size": 128}, (1.125, 1.125)),
    ("billm", {}, (2.5, 2.52)),  # 2 planes + column bitmap + 4 fp16 scales per (row, 128 columns)
    ("billm", {"salient_columns": 8, "block_size": 64}, (3.0, 3.02)),  # scales: 64 bits per 64 columns
    ("pbllm", {}, (2.8, 2.85)),  # bitmap 1 + signs 0.9 + int8 0.8 + scales 2 * 16 / 256
    # Below 1/14 salient the 14-bit flat indices beat the bitmap: 0.98 + 0.02 * (14 + 16) + 2 * 16 / 128.
    ("pbllm", {"salient_fraction": 0.02, "salient_format": "fp16", "group_size": 128}, (1.70, 1.71)),
    ("dyngroup", {}, (3.0, 3.01)),  # sign + 2-bit group index + 4 scales
    ("dyngroup", {"structure": "row"}, (3.0, 3.3)),
    ("dyngroup", {"structure": "row", "method": "dp"}, (3.0, 3.3)),
    ("dyngroup", {"method": "greedy", "max_groups": 8}, (4.0, 4.01)),
    # structured: a 4-bit index per (row, 128 columns) + 16 shared scales
    ("dyngroup", {"structure": "block", "max_groups": 16, "lambda_reg": 0.0}, (1 + 4 / 128, 1 + 4 / 128 + 16 * 16 / (ROWS * COLS))),
    ("w1p1", {}, (2.25, 2.25)),
    ("w1p1", {"error_feedback": False, "weighting": "plain", "group_size": None}, (2 + 32 / COLS, 2 + 32 / COLS)),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in settings.items()) or 'default'}" for name, settings, _ in CONFIGS]


def make_layer(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(ROWS, COLS, generator=g) * 0.02
    weight *= torch.exp(0.3 * torch.randn(ROWS, 1, generator=g))  # rows of different magnitude
    outliers = torch.randperm(ROWS * COLS, generator=g)[:40]
    weight.view(-1)[outliers] *= 8
    samples = 1024
    mixing = torch.randn(COLS, COLS, generator=g) / math.sqrt(COLS) + torch.eye(COLS)
    input_scale = torch.exp(torch.randn(COLS, generator=g))  # a few loud input channels
    x = (torch.randn(samples, COLS, generator=g) @ mixing) * input_scale
    return weight, 2 * x.T @ x / samples


def hessian_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace((W - Q) H (W - Q)^T)``: the layer's output error over the calibration inputs."""
    diff = (weight - quantized).double()
    return float(torch.trace(diff @ hessian.double() @ diff.T))


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor]:
    return make_layer()


@pytest.fixture(scope="module")
def results(layer: tuple[torch.Tensor, torch.Tensor]) -> dict[str, tuple[Quantizer, QuantizedTensor]]:
    weight, hessian = layer
    out = {}
    for (name, settings, _), test_id in zip(CONFIGS, IDS):
        quantizer = build_quantizer(name, **settings)
        out[test_id] = (quantizer, quantizer.quantize(weight, hessian))
    return out


@pytest.fixture(scope="module")
def xnor_error(layer: tuple[torch.Tensor, torch.Tensor]) -> float:
    weight, hessian = layer
    return hessian_error(weight, build_quantizer("xnor").quantize(weight).dequantized, hessian)


def test_registered() -> None:
    for name in ("xnor", "billm", "pbllm", "dyngroup", "w1p1"):
        assert name in QUANTIZERS
        quantizer = build_quantizer(name)
        settings = quantizer.settings()
        assert settings.pop("quantizer") == name
        assert build_quantizer(name, **settings).settings() == quantizer.settings()


@pytest.mark.parametrize("test_id", IDS)
def test_decode_is_bit_exact(results: dict, test_id: str) -> None:
    _, qt = results[test_id]
    assert qt.dequantized.dtype == torch.float32 and qt.dequantized.shape == (ROWS, COLS)
    assert torch.equal(decode(qt), qt.dequantized)
    # The decoder needs nothing but the stored tensors, the meta and the shape.
    stored = {k: v.clone() for k, v in qt.stored.items()}
    copy = QuantizedTensor(qt.format, qt.shape, stored, dict(qt.meta), torch.empty(0))
    assert torch.equal(decode(copy), qt.dequantized)


@pytest.mark.parametrize("test_id", IDS)
def test_storage_bits(results: dict, test_id: str) -> None:
    quantizer, qt = results[test_id]
    assert all(t.dtype in (torch.uint8, torch.float16) for t in qt.stored.values())
    assert qt.storage_bits == 8 * sum(t.numel() * t.element_size() for t in qt.stored.values())
    if not isinstance(quantizer, DynGroupQuantizer):
        assert qt.storage_bits == quantizer.storage_bits(ROWS, COLS)
        return
    # Data-dependent: the index width follows the number of groups found, and
    # Quantizer.storage_bits (max_groups everywhere) bounds the real size.
    width = qt.meta["index_bits"]
    assert width == index_bits(qt.meta["groups"]) == math.ceil(math.log2(qt.meta["groups"]))
    indexed = ROWS * math.ceil(COLS / quantizer.block_size) if quantizer.structure == "block" else ROWS * COLS
    assert qt.stored["groups"].numel() == math.ceil(indexed * width / 8)
    assert qt.stored["scales"].numel() <= (ROWS if quantizer.structure == "row" else 1) * quantizer.max_groups
    counts = [qt.stored["scales"].numel()]
    if quantizer.structure == "row":
        counts = [int(c) + 1 for c in decode_counts(qt)]
    block_size = quantizer.block_size if quantizer.structure == "block" else None
    assert qt.storage_bits == dyngroup_storage_bits((ROWS, COLS), counts, quantizer.structure, block_size)
    assert qt.storage_bits <= quantizer.storage_bits(ROWS, COLS)


def decode_counts(qt: QuantizedTensor) -> torch.Tensor:
    return unpack_codes(qt.stored["group_counts"], qt.meta["index_bits"], ROWS)


@pytest.mark.parametrize("test_id", IDS)
def test_bits_per_weight_in_range(results: dict, test_id: str) -> None:
    low, high = CONFIGS[IDS.index(test_id)][2]
    _, qt = results[test_id]
    assert low - 1e-9 <= qt.bits_per_weight <= high + 1e-9


def test_dyngroup_reports_the_paper_bits(results: dict) -> None:
    _, qt = results["dyngroup-default"]
    assert qt.meta["groups"] == 4
    assert qt.meta["paper_bpw"] == pytest.approx(1 + 16 * 4 / (ROWS * COLS))
    assert qt.bits_per_weight == pytest.approx(qt.meta["paper_bpw"] + 2, abs=1e-3)  # + the 2-bit index


@pytest.mark.parametrize("test_id", [i for i in IDS if not i.startswith("xnor")])
def test_hessian_error_below_xnor(results: dict, layer: tuple, xnor_error: float, test_id: str) -> None:
    weight, hessian = layer
    _, qt = results[test_id]
    assert hessian_error(weight, qt.dequantized, hessian) < xnor_error


def test_error_feedback_helps(results: dict, layer: tuple) -> None:
    weight, hessian = layer
    with_feedback = results["w1p1-default"][1]
    without = build_quantizer("w1p1", error_feedback=False).quantize(weight, hessian)
    assert hessian_error(weight, with_feedback.dequantized, hessian) < hessian_error(weight, without.dequantized, hessian)


@pytest.mark.parametrize("test_id", IDS)
def test_deterministic(results: dict, layer: tuple, test_id: str) -> None:
    weight, hessian = layer
    quantizer, first = results[test_id]
    settings = {k: v for k, v in quantizer.settings().items() if k != "quantizer"}
    second = build_quantizer(quantizer.name, **settings).quantize(weight.clone(), hessian.clone())
    assert first.meta == second.meta
    assert first.stored.keys() == second.stored.keys()
    assert all(torch.equal(first.stored[k], second.stored[k]) for k in first.stored)
    assert torch.equal(first.dequantized, second.dequantized)


def test_hessian_required(layer: tuple) -> None:
    weight, _ = layer
    for name in ("billm", "pbllm", "w1p1"):
        with pytest.raises(ValueError, match="Hessian"):
            build_quantizer(name).quantize(weight)
    # Without error feedback and with plain weighting W(1+1) needs no calibration data.
    qt = build_quantizer("w1p1", error_feedback=False, weighting="plain").quantize(weight)
    assert torch.equal(decode(qt), qt.dequantized)


def test_dead_inputs_are_zeroed(layer: tuple) -> None:
    weight, hessian = layer
    h = hessian.clone()
    h[:, 5] = 0
    h[5, :] = 0
    for name in ("billm", "pbllm", "w1p1"):
        qt = build_quantizer(name).quantize(weight, h)
        assert torch.isfinite(qt.dequantized).all()
        assert torch.equal(decode(qt), qt.dequantized)


def test_pbllm_keeps_the_most_salient_weights(results: dict, layer: tuple) -> None:
    weight, _ = layer
    quantizer, qt = results["pbllm-default"]
    assert qt.meta["positions"] == "bitmap"
    assert qt.meta["salient_count"] == round(0.1 * ROWS * COLS)
    # The injected outliers dominate the saliency and keep (nearly) their value.
    big = weight.abs() > 6 * 0.02 * 2
    rel = ((qt.dequantized - weight).abs() / weight.abs())[big]
    assert rel.median() < 0.05


def test_pbllm_index_positions(results: dict) -> None:
    _, qt = results["pbllm-salient_fraction=0.02-salient_format=fp16-group_size=128"]
    assert qt.meta["positions"] == "index" and qt.meta["position_bits"] == 14
    assert "positions" in qt.stored and "mask" not in qt.stored


def test_billm_structure(results: dict) -> None:
    quantizer, qt = results["billm-salient_columns=8-block_size=64"]
    assert qt.meta["salient_columns"] == 8 * (COLS // 64)
    _, searched = results["billm-default"]
    assert 0 <= searched.meta["salient_columns"] <= 2 * quantizer.max_salient_columns


# ----------------------------------------------------------------------------- building blocks


def brute_force_segmentation(values: np.ndarray, max_groups: int, lam: float) -> float:
    n = len(values)
    best = math.inf
    for g in range(1, min(max_groups, n) + 1):
        for cuts in itertools.combinations(range(1, n), g - 1):
            best = min(best, segmentation_objective(values, [0, *cuts, n], lam))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_segment_dp_is_optimal(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = np.sort(np.abs(rng.standard_normal(11)) * np.where(rng.random(11) < 0.2, 5, 1))
    for max_groups, lam in ((1, 0.0), (3, 0.0), (4, 0.5), (11, 0.2)):
        bounds = segment_dp(values, max_groups, lam)
        assert bounds[0] == 0 and bounds[-1] == len(values) and len(bounds) - 1 <= max_groups
        best = brute_force_segmentation(values, max_groups, lam)
        assert segmentation_objective(values, bounds, lam) == pytest.approx(best)


@pytest.mark.parametrize("window", [1, 4])
def test_segment_greedy_is_valid_and_not_better_than_dp(window: int) -> None:
    values = np.sort(np.abs(np.random.default_rng(0).standard_normal(300)))
    lam = 0.05 * float(values @ values)
    exact = segmentation_objective(values, segment_dp(values, 6, lam), lam)
    bounds = segment_greedy(values, 6, lam, window=window)
    assert bounds[0] == 0 and bounds[-1] == 300 and len(bounds) - 1 <= 6
    assert all(b > a for a, b in zip(bounds[:-1], bounds[1:]))
    assert all(b % window == 0 for b in bounds[:-1])
    assert exact <= segmentation_objective(values, bounds, lam) + 1e-9


def test_pack_wide_round_trip() -> None:
    codes = torch.tensor([0, 1, 16383, 5000, 77, 12345, 9])
    for bits in (14, 20):
        packed = pack_wide(codes, bits)
        assert packed.numel() == math.ceil(len(codes) * bits / 8)
        assert torch.equal(unpack_wide(packed, bits, len(codes)), codes)


def test_em_scales_are_a_fixed_point() -> None:
    magnitudes = torch.rand(16, 100).abs() ** 2
    weights = torch.rand(100) + 0.1
    low, high = fit_two_scales(magnitudes, weights, 100)
    member = (magnitudes - high[:, None]).abs() < (magnitudes - low[:, None]).abs()
    w = weights.double()[None, :]
    a = magnitudes.double()
    assert torch.allclose(high.double(), (w * a * member).sum(1) / (w * member).sum(1), rtol=1e-5)
    assert torch.allclose(low.double(), (w * a * ~member).sum(1) / (w * ~member).sum(1), rtol=1e-5)
    assert (low <= high).all()
