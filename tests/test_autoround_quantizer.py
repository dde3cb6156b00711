"""The autoround option: AutoRound's SignRound (the auto-round library) on one layer from its Hessian."""

from __future__ import annotations

import pytest
import torch

from allocator.errors import BitallocError
from allocator.table.options import parse_options
from quantizers import build_quantizer, decode
from quantizers.autoround import AutoRoundQuantizer, hessian_inputs
from quantizers.rtn import RTNQuantizer

pytest.importorskip("auto_round")


def layer(out_features: int = 64, in_features: int = 192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features**0.5
    inputs = torch.randn(1024, in_features, generator=generator) @ mixing * torch.linspace(0.2, 3.0, in_features)
    return weight, 2 * inputs.T @ inputs / inputs.shape[0]


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = (quantized - weight).double()
    return float(torch.trace(delta @ hessian.double() @ delta.T))


def test_hessian_rows_reproduce_the_damped_hessian() -> None:
    _, hessian = layer(in_features=203)  # not a multiple of the 8 samples: zero rows pad it
    rows = hessian_inputs(hessian, 0.01)
    assert rows.shape == (208, 203)
    damped = hessian.double() + 0.01 * torch.diag(hessian.double()).mean() * torch.eye(203, dtype=torch.float64)
    torch.testing.assert_close(rows.double().T @ rows.double(), damped, rtol=1e-5, atol=1e-5 * float(damped.abs().max()))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_stored_form_decodes_to_the_tuned_weight_at_its_honest_bits(bits: int) -> None:
    weight, hessian = layer()
    quantizer = AutoRoundQuantizer(bits, group_size=64, iters=20)
    qt = quantizer.quantize(weight, hessian)
    assert qt.storage_bits == quantizer.storage_bits(*weight.shape)
    # codes on the symmetric grid + fp16 scales (no zero points): b + 16 / 64 bits per weight, before packing
    assert abs(qt.bits_per_weight - (bits + 16 / 64)) < 0.02
    assert torch.equal(decode(qt), qt.dequantized)
    # the grid: 2^bits levels per group, symmetric about zero
    levels = {round(v, 6) for v in (qt.dequantized[:, :64] / qt.stored["scales"][:, :1].float()).flatten().tolist()}
    assert levels <= {float(q) for q in range(-(1 << (bits - 1)), 1 << (bits - 1))}


def test_tuning_beats_round_to_nearest_on_the_layer_objective_and_repeats_bit_for_bit() -> None:
    weight, hessian = layer()
    tuned = AutoRoundQuantizer(3, group_size=64, iters=100)
    first, second = tuned.quantize(weight, hessian), tuned.quantize(weight, hessian)
    assert all(torch.equal(first.stored[k], second.stored[k]) for k in first.stored)
    nearest = RTNQuantizer(3, group_size=64, symmetric=True).quantize(weight)
    assert output_error(weight, first.dequantized, hessian) < 0.9 * output_error(weight, nearest.dequantized, hessian)


def test_option_specs_and_settings_round_trip() -> None:
    option = parse_options(["autoround3:iters=50,lr=0.005"])[0]
    assert option.label == "autoround-w3g128-i50"
    assert option.settings == {"quantizer": "autoround", "bits": 3, "group_size": 128, "iters": 50, "lr": 0.005, "damp_ratio": 0.01}
    rebuilt = build_quantizer(**{"name": option.settings["quantizer"], **{k: v for k, v in option.settings.items() if k != "quantizer"}})
    assert rebuilt.settings() == option.settings
    for bad in ("autoround1", "autoround3:iters=0", "autoround3:lr=-1"):
        with pytest.raises(BitallocError):
            parse_options([bad])


def test_without_a_hessian_or_on_a_shape_autoround_skips_it_refuses() -> None:
    weight, hessian = layer()
    with pytest.raises(ValueError, match="Hessian"):
        AutoRoundQuantizer(3).quantize(weight)
    odd, odd_hessian = layer(in_features=200)
    with pytest.raises(ValueError, match="multiples of 32"):
        AutoRoundQuantizer(3).quantize(odd, odd_hessian)
