"""The autoround option: AutoRound's SignRound (the auto-round library) on one layer from its Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from allocator.errors import BitallocError
from allocator.runtime.packed import load_quantized
from allocator.table.bitmap import BitMap
from allocator.table.options import parse_options
from allocator.table.sensitivity import SensitivityTable
from quantizers import build_quantizer, decode
from quantizers.autoround import AutoRoundQuantizer, hessian_inputs
from quantizers.rtn import RTNQuantizer
from tests.cli_helpers import run

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


def test_without_a_hessian_it_refuses() -> None:
    weight, _ = layer()
    with pytest.raises(ValueError, match="Hessian"):
        AutoRoundQuantizer(3).quantize(weight)


def test_a_shape_autoround_would_skip_is_padded_and_tuned() -> None:
    """48 x 200 (not multiples of 32, the last group of 64 short): quantized, not left in float, and its stored form
    decodes to the tuned weight."""
    weight, hessian = layer(out_features=48, in_features=200)
    quantizer = AutoRoundQuantizer(3, group_size=64, iters=50)
    qt = quantizer.quantize(weight, hessian)
    assert qt.shape == (48, 200) and qt.stored["scales"].shape == (48, 4)
    assert torch.equal(decode(qt), qt.dequantized)
    nearest = RTNQuantizer(3, group_size=64, symmetric=True).quantize(weight)
    assert output_error(weight, qt.dequantized, hessian) < output_error(weight, nearest.dequantized, hessian)


def test_profile_solve_quantize_with_the_autoround_option(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> None:
    """The option goes through the CLI like any other: profiled beside GPTQ (the tiny model's 48-row k/v projections
    padded), solved, quantized on the quantized prefix and packed."""
    common = ["--corpus", str(text_file), "--samples", "4", "--seqlen", "32", "--no-progress"]
    table_path, bitmap_path, packed = tmp_path / "table.npz", tmp_path / "bitmap.json", tmp_path / "packed"
    code, _, err = run(capsys, "profile", "--model", str(tiny_model_dir), "--options", "gptq2", "autoround3:iters=10", "--out", str(table_path),
                       *common)
    assert code == 0, err
    table = SensitivityTable.load(table_path)
    assert table.labels == ["gptq-w2g128", "autoround-w3g128-i10"]
    assert np.isfinite(table.loss("hessian_err")).all()
    code, _, err = run(capsys, "solve", "--profile", str(table_path), "--bpw", "3.5", "--out", str(bitmap_path))
    assert code == 0, err
    chosen = {e.option for e in BitMap.load(bitmap_path).modules.values()}
    assert "autoround-w3g128-i10" in chosen and chosen <= set(table.labels)
    code, _, err = run(capsys, "quantize", "--bitmap", str(bitmap_path), "--out", str(packed), *common)
    assert code == 0, err
    assert load_quantized(packed).quantized.bits_per_weight == pytest.approx(BitMap.load(bitmap_path).predicted_bpw)
