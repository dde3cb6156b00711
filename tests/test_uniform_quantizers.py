"""RTN and GPTQ: honest bits (stored bytes rebuild the weight), grids, and GPTQ beating RTN."""

import pytest
import torch

from quantizers import GPTQQuantizer, RTNQuantizer, build_quantizer, decode
from quantizers.base import GroupLayout
from quantizers.grid import GridSpec, dequantize_codes, fit_clipped, fit_minmax, quantize_codes


def weight_and_hessian(rows: int = 48, cols: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    weight[:, 3] *= 8  # an outlier column, as in real LLM layers
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5
    inputs = torch.randn(2048, cols, generator=g) @ mixing + 0.3 * torch.randn(2048, cols, generator=g)
    inputs[:, 5] *= 10
    return weight, 2 * inputs.T @ inputs / inputs.shape[0]


def hessian_error(weight: torch.Tensor, hessian: torch.Tensor, quantized: torch.Tensor) -> float:
    delta = weight - quantized
    return torch.trace(delta @ hessian @ delta.T).item()


QUANTIZER_GRID = [
    (cls, bits, group, sym)
    for cls in (RTNQuantizer, GPTQQuantizer)
    for bits in (1, 2, 3, 4, 8)
    for group in (None, 32, 64)  # 64 leaves a shorter last group on width 96
    for sym in (False, True)
]
CLIPPED_GRID = [(cls, bits, sym) for cls in (RTNQuantizer, GPTQQuantizer) for bits in (2, 3) for sym in (False, True)]


@pytest.mark.parametrize("cls,bits,group,sym", QUANTIZER_GRID)
def test_stored_bytes_are_the_reported_bits_and_rebuild_the_weight(cls, bits, group, sym) -> None:
    weight, hessian = weight_and_hessian()
    quantizer = cls(bits=bits, group_size=group, symmetric=sym)
    qt = quantizer.quantize(weight, hessian)
    stored_bits = 8 * sum(t.numel() * t.element_size() for t in qt.stored.values())
    assert qt.storage_bits == stored_bits == quantizer.storage_bits(*weight.shape)
    assert torch.equal(decode(qt), qt.dequantized)
    # Independently: bit-packed codes, one fp16 scale per (row, group), bit-packed zero points.
    groups = 48 * GroupLayout(weight.shape[1], group).count
    zero_bits = 0 if sym else 8 * -(-groups * bits // 8)
    assert qt.storage_bits == 8 * -(-48 * 96 * bits // 8) + 16 * groups + zero_bits


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_group_uses_at_most_2_pow_bits_levels(bits: int) -> None:
    weight, _ = weight_and_hessian()
    qt = RTNQuantizer(bits, group_size=32).quantize(weight)
    for start in range(0, 96, 32):
        for row in qt.dequantized[:, start : start + 32]:
            assert row.unique().numel() <= 2**bits


@pytest.mark.parametrize("bits,sym,group,shape", [(2, False, 128, (48, 256)), (3, True, 64, (40, 192)), (4, False, None, (16, 96)),
                                                  (1, False, 32, (8, 64)), (2, False, 128, (24, 200))])
def test_rtn_minmax_equals_the_group_by_group_rule_exactly(bits: int, sym: bool, group: int | None, shape: tuple[int, int]) -> None:
    """The all-groups-at-once min-max path (and the ragged-group loop) store exactly what fitting each group's slice does."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(bits)) * torch.linspace(0.1, 3, shape[1])
    spec = GridSpec(bits, sym)
    layout = GroupLayout(shape[1], group)
    codes, scales, zeros = torch.empty_like(w), torch.empty(shape[0], layout.count), torch.empty(shape[0], layout.count)
    for g in range(layout.count):
        start, stop = layout.bounds(g)
        scales[:, g], zeros[:, g] = fit_minmax(w[:, start:stop], spec)
        codes[:, start:stop] = quantize_codes(w[:, start:stop], scales[:, g], zeros[:, g], spec)
    expected = (codes - zeros.repeat_interleave(layout.size, dim=1)[:, : shape[1]]) * scales.repeat_interleave(layout.size, dim=1)[:, : shape[1]]
    assert torch.equal(RTNQuantizer(bits, group, sym).quantize(w).dequantized, expected)


def test_rtn_error_falls_with_bits() -> None:
    weight, _ = weight_and_hessian()
    errors = [(RTNQuantizer(b, 32).quantize(weight).dequantized - weight).pow(2).mean().item() for b in (1, 2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_hessian_weighted_error(bits: int, act_order: bool) -> None:
    weight, hessian = weight_and_hessian()
    rtn = RTNQuantizer(bits, 32).quantize(weight)
    gptq = GPTQQuantizer(bits, 32, act_order=act_order).quantize(weight, hessian)
    assert hessian_error(weight, hessian, gptq.dequantized) < 0.9 * hessian_error(weight, hessian, rtn.dequantized)


def test_gptq_is_deterministic_and_handles_dead_inputs() -> None:
    weight, hessian = weight_and_hessian()
    hessian[7, :] = 0
    hessian[:, 7] = 0
    first = GPTQQuantizer(3, 32).quantize(weight, hessian)
    second = GPTQQuantizer(3, 32).quantize(weight, hessian)
    assert torch.equal(first.dequantized, second.dequantized)
    assert torch.isfinite(first.dequantized).all()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_many_is_bit_identical_to_one_by_one(act_order: bool) -> None:
    from quantizers.gptq import gptq_many

    weight, hessian = weight_and_hessian()
    hessian[5, :] = 0
    hessian[:, 5] = 0  # a dead input too
    grids = [(2, False, "mse"), (3, True, "minmax"), (4, False, "minmax"), (1, False, "mse")]
    quantizers = [GPTQQuantizer(b, 32, symmetric=sym, act_order=act_order, clip=clip) for b, sym, clip in grids]
    together = gptq_many(quantizers, weight, hessian)
    for quantizer, result in zip(quantizers, together):
        alone = quantizer.quantize(weight, hessian)
        assert torch.equal(result.dequantized, alone.dequantized) and result.storage_bits == alone.storage_bits
        assert all(torch.equal(result.stored[k], alone.stored[k]) for k in alone.stored)
    with pytest.raises(ValueError, match="differ only in their grids"):
        gptq_many([GPTQQuantizer(2, 32), GPTQQuantizer(2, 64)], weight, hessian)


def test_gptq_requires_hessian() -> None:
    with pytest.raises(ValueError):
        GPTQQuantizer(3).quantize(torch.randn(4, 8))


def weighted_rounding_error(w: torch.Tensor, fit: tuple[torch.Tensor, torch.Tensor], spec: GridSpec, weights: torch.Tensor) -> torch.Tensor:
    scale, zero = fit
    return ((w - dequantize_codes(quantize_codes(w, scale, zero, spec), scale, zero)) ** 2) @ weights


@pytest.mark.parametrize("bits,sym", [(2, False), (3, False), (4, False), (3, True)])
def test_mse_fit_is_never_worse_than_minmax_and_clips_an_outlier(bits: int, sym: bool) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g)
    w[:, 0] *= 6  # one outlier per row stretches the min-max range
    weights = torch.rand(128, generator=g) + 0.1
    spec = GridSpec(bits, sym)
    minmax = weighted_rounding_error(w, fit_minmax(w, spec), spec, weights)
    clipped_fit = fit_clipped(w, spec, weights)
    clipped = weighted_rounding_error(w, clipped_fit, spec, weights)
    assert (clipped <= minmax + 1e-6).all()
    assert clipped.sum() < 0.9 * minmax.sum()
    assert (clipped_fit[0] <= fit_minmax(w, spec)[0]).all()  # only ever a narrower range
    # the binary symmetric grid is already L2-optimal: left as fitted
    binary = GridSpec(1, True)
    assert all(torch.equal(a, b) for a, b in zip(fit_clipped(w, binary, weights), fit_minmax(w, binary)))


@pytest.mark.parametrize("cls,bits,sym", CLIPPED_GRID)
def test_mse_clip_keeps_the_stored_form_and_lowers_the_hessian_error(cls, bits, sym) -> None:
    weight, hessian = weight_and_hessian()
    weight[:, 40] *= 6  # outliers inside one group's columns, so clipping has something to win
    plain = cls(bits, 32, sym).quantize(weight, hessian)
    clipped_quantizer = cls(bits, 32, sym, clip="mse")
    clipped = clipped_quantizer.quantize(weight, hessian)
    assert clipped.storage_bits == plain.storage_bits == clipped_quantizer.storage_bits(*weight.shape)
    assert torch.equal(decode(clipped), clipped.dequantized)
    assert hessian_error(weight, hessian, clipped.dequantized) < hessian_error(weight, hessian, plain.dequantized)


def test_clip_is_named_in_settings_and_label_only_when_not_minmax() -> None:
    assert "clip" not in GPTQQuantizer(3).settings() and "clip" not in RTNQuantizer(3).settings()
    assert GPTQQuantizer(3, clip="mse").settings()["clip"] == "mse"
    assert GPTQQuantizer(3, clip="mse").label() == "gptq-w3g128-mse"
    assert RTNQuantizer(2, 64, clip="mse").label() == "rtn-w2g64-mse"
    with pytest.raises(ValueError, match="clip"):
        GPTQQuantizer(3, clip="percentile")


def test_build_quantizer_round_trips_settings() -> None:
    for quantizer in (RTNQuantizer(3, 64, True), GPTQQuantizer(2, None, act_order=True), GPTQQuantizer(3, clip="mse"),
                      RTNQuantizer(2, clip="mse")):
        rebuilt = build_quantizer(**{k: v for k, v in quantizer.settings().items() if k != "quantizer"}, name=quantizer.name)
        assert rebuilt.settings() == quantizer.settings()
    with pytest.raises(ValueError):
        build_quantizer("nope")


@pytest.mark.parametrize("name,settings", [("gptq", {"bits": 3}), ("rtn", {"bits": 3}), ("xnor", {}), ("w1p1", {}), ("pbllm", {})])
def test_group_size_minus_one_is_one_group_per_row_and_other_non_positive_sizes_raise(name: str, settings: dict) -> None:
    per_row = build_quantizer(name, **settings, group_size=None)
    minus_one = build_quantizer(name, **settings, group_size=-1)
    assert minus_one.settings() == per_row.settings() and minus_one.label() == per_row.label()
    assert minus_one.storage_bits(64, 96) == per_row.storage_bits(64, 96) > 0
    for bad in (0, -2):
        with pytest.raises(ValueError, match="group_size"):
            build_quantizer(name, **settings, group_size=bad)


def test_inverse_hessian_cholesky_is_the_damped_formula_bit_for_bit() -> None:
    from quantizers.gptq import inverse_hessian_cholesky

    x = torch.randn(300, 48, generator=torch.Generator().manual_seed(0))
    hessian = 2 * x.T @ x / 300
    hessian[:, 5] = hessian[5, :] = 0  # a dead input: damping alone makes it positive definite
    h = hessian.double()
    mean = torch.diag(h).mean()
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h + 0.01 * mean * torch.eye(48, dtype=h.dtype))), upper=True)
    assert torch.equal(inverse_hessian_cholesky(hessian, 0.01), expected.float())
