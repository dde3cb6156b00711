"""Scale folding (allocator/quantize/scalefold.py): the float function is kept, outliers stop hurting RTN,
the CLI flags, and the packed format carries the folded norms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedModel

import allocator.quantize.scalefold as scalefold
from allocator.errors import BitallocError
from allocator.evaluate.perplexity import REFERENCE, evaluate
from allocator.measure.profile import CODE_VERSION, cached_table_path
from allocator.model.calibration import HessianAccumulator
from allocator.model.layers import quantizable_linears, swapped_weights
from allocator.quantize.apply import quantize_model, quantize_with_scale_fold
from allocator.quantize.scalefold import ScaleFoldSettings, compute_scale_fold, hessian_error
from allocator.runtime.packed import CONFIG_FILE, check_float_weights, load_quantized, save_quantized
from allocator.table.options import quantizer_from_settings
from allocator.table.sensitivity import SensitivityTable
from quantizers import RTNQuantizer
from tests.cli_helpers import run
from tests.conftest import WORDS, tiny_llama

CALIBRATION = ["--samples", "4", "--seqlen", "32"]
OUTLIER_CHANNELS = [5, 17, 40]


def tokens(rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(2, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def llama_with_outliers() -> PreTrainedModel:
    """The tiny llama with uneven norms and a few channels amplified 30x before q/k/v (as real
    LLMs have), so the folds are far from the identity."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            layer.input_layernorm.weight[OUTLIER_CHANNELS] = 30.0
            layer.post_attention_layernorm.weight[[8, 60]] = 25.0
    return model


def tiny_gemma3() -> Gemma3ForCausalLM:
    """A random tiny Gemma3 text model: 4 query heads on 1 kv head, a sliding and a full attention
    layer, and random (not zero) norm weights so that Gemma's ``1 + w`` matters."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=128, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.5)
        model.model.layers[0].input_layernorm.weight[[3, 9]] = 20.0
    return model


def folded_logits(model: PreTrainedModel, overlay: dict[str, torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        with swapped_weights(model, overlay):
            folded = model(ids, use_cache=False).logits
    return reference, folded


@pytest.mark.parametrize("alpha", [0.5, None], ids=["alpha0.5", "search"])
def test_fold_keeps_the_llama_function(alpha) -> None:
    model = llama_with_outliers()
    fold, overlay = compute_scale_fold(model, tokens(4, 32, len(WORDS) + 2, 0), ScaleFoldSettings(alpha=alpha), progress=False)
    sources = [g.source for g in fold.groups]
    assert sources == [f"model.layers.{b}.{s}" for b in (0, 1)
                       for s in ("input_layernorm", "self_attn.v_proj", "post_attention_layernorm", "mlp.up_proj")]
    first = fold.groups[0]
    assert first.alpha is not None and first.scales.dtype == torch.float32
    assert first.scales.max() / first.scales.min() > 3  # the outliers give a real transform
    # llama's norm multiplies by w: the fold divides it by s
    norm = model.model.layers[0].input_layernorm.weight.detach()
    torch.testing.assert_close(overlay[first.source], norm / first.scales, rtol=1e-6, atol=0)
    reference, folded = folded_logits(model, overlay, tokens(2, 40, len(WORDS) + 2, 1))
    torch.testing.assert_close(folded, reference, rtol=0, atol=1e-4 * float(reference.abs().max()))


def test_fold_keeps_the_gemma3_function_and_its_one_plus_w_norm() -> None:
    model = tiny_gemma3()
    samples = tokens(4, 32, 64, 0)
    fold, overlay = compute_scale_fold(model, samples, ScaleFoldSettings(), progress=False)
    sources = [g.source.split(".", 3)[-1] for g in fold.groups]
    assert sources == ["input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj"] * 2
    first = fold.groups[0]
    norm = model.model.layers[0].input_layernorm.weight.detach()
    torch.testing.assert_close(overlay[first.source], (1 + norm) / first.scales - 1, rtol=1e-5, atol=1e-6)
    # GQA: 4 query heads read 1 kv head, so o_proj's columns repeat v_proj's 32 row scales 4 times
    v_scales = fold.groups[1].scales
    assert v_scales.shape == (32,)
    o_name = "model.layers.0.self_attn.o_proj"
    o_weight = dict(model.named_modules())[o_name].weight.detach()
    torch.testing.assert_close(overlay[o_name], o_weight * v_scales.repeat(4)[None, :], rtol=1e-6, atol=0)
    reference, folded = folded_logits(model, overlay, tokens(2, 40, 64, 1))
    assert folded.shape == reference.shape
    torch.testing.assert_close(folded, reference, rtol=0, atol=1e-4 * float(reference.abs().max()))


def test_a_wrong_fold_is_caught_by_the_block_check(monkeypatch) -> None:
    """Folding Gemma's (1 + w) norm as if it were llama's w changes the block: refused."""
    monkeypatch.setattr(scalefold, "_norm_offset", lambda norm: 0.0)
    with pytest.raises(BitallocError, match="changes the output of decoder block 0"):
        compute_scale_fold(tiny_gemma3(), tokens(2, 32, 64, 0), ScaleFoldSettings(), progress=False)


def qkv_error(model: PreTrainedModel, overlay: dict[str, torch.Tensor], scales: torch.Tensor, hessian: torch.Tensor) -> float:
    """Hessian-weighted RTN 3-bit g32 error of block 0's q/k/v in the reference coordinates."""
    quantizer = RTNQuantizer(3, 32)
    modules = dict(model.named_modules())
    total = 0.0
    for part in "qkv":
        name = f"model.layers.0.self_attn.{part}_proj"
        weight = modules[name].weight.detach()
        folded = overlay.get(name, weight)
        total += hessian_error(weight, quantizer.quantize(folded).dequantized / scales[None, :], hessian)
    return total


def test_folding_lowers_rtn3_error_with_planted_outliers() -> None:
    model = llama_with_outliers()
    samples = tokens(8, 32, len(WORDS) + 2, 0)
    accumulator = HessianAccumulator(96)
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, args: accumulator.add(args[0]))
    with torch.no_grad():
        model(samples)
    handle.remove()
    hessian = accumulator.hessian()
    qkv = {f"model.layers.0.self_attn.{p}_proj": RTNQuantizer(3, 32) for p in "qkv"}  # only the input_layernorm site
    plain = qkv_error(model, {}, torch.ones(96), hessian)
    errors = {}
    for alpha in (0.5, None):
        fold, overlay = compute_scale_fold(model, samples, ScaleFoldSettings(alpha=alpha), qkv, progress=False)
        assert [g.source for g in fold.groups] == ["model.layers.0.input_layernorm"]
        errors[alpha] = qkv_error(model, overlay, fold.groups[0].scales, hessian)
    assert errors[0.5] < 0.5 * plain
    # the search minimizes exactly this error over a grid that holds 0.5
    assert errors[None] <= errors[0.5] * (1 + 1e-5)
    # and end to end: the whole model at RTN 3-bit is closer to the reference with folding
    names = list(quantizable_linears(model))
    rtn3 = {name: RTNQuantizer(3, 32) for name in names}
    variants = {
        "plain": quantize_model(model, rtn3, progress=False).dequantized_weights(),
        "folded": quantize_with_scale_fold(model, rtn3, samples, ScaleFoldSettings(), progress=False).dequantized_weights(),
    }
    results = evaluate(model, tokens(4, 32, len(WORDS) + 2, 2), variants, progress=False)
    assert results["folded"].kl < 0.6 * results["plain"].kl


def test_packed_round_trip_keeps_the_folded_norms(tmp_path: Path) -> None:
    model = tiny_gemma3()
    samples = tokens(4, 32, 64, 0)
    names = list(quantizable_linears(model))
    # 8 bits, so that what is left of the reference's function shows whether the norms came along
    settings = [{"quantizer": "gptq", "bits": 8, "group_size": 32}, {"quantizer": "rtn", "bits": 8, "group_size": 32}]
    assignment = {name: quantizer_from_settings(settings[i % 2]) for i, name in enumerate(names)}
    quantized = quantize_with_scale_fold(model, assignment, samples, ScaleFoldSettings(alpha=None), progress=False)
    norms = sorted(quantized.float_weights)
    assert norms == [f"model.layers.{b}.{n}" for b in (0, 1) for n in ("input_layernorm", "pre_feedforward_layernorm")]
    target = tmp_path / "packed"
    save_quantized(target, "tiny-gemma3", quantized, {n: q.settings() for n, q in assignment.items()})
    config = json.loads((target / CONFIG_FILE).read_text())
    assert config["schema_version"] == 2 and sorted(config["float_tensors"]) == norms
    assert config["scale_fold"]["settings"]["alpha"] == "search"
    packed = load_quantized(target)
    back = packed.quantized
    assert sorted(back.float_weights) == norms
    for name in norms:
        assert back.float_weights[name].dtype == torch.float32
        assert torch.equal(back.float_weights[name], quantized.float_weights[name])
    assert back.scale_fold is not None and quantized.scale_fold is not None
    assert back.scale_fold.settings == quantized.scale_fold.settings
    for a, b in zip(back.scale_fold.groups, quantized.scale_fold.groups):
        assert (a.source, a.targets, a.alpha) == (b.source, b.targets, b.alpha) and torch.equal(a.scales, b.scales)
    windows = tokens(2, 24, 64, 1)
    results = evaluate(model, windows, {"memory": quantized.dequantized_weights(), "disk": back.dequantized_weights(),
                                        "no_norms": {n: qt.dequantized for n, qt in back.tensors.items()}}, progress=False)
    assert results["memory"].perplexity == results["disk"].perplexity and results["disk"].kl < 1e-4
    # the folded linears need their folded norms: without them the model is far off the reference
    assert results["no_norms"].kl > 100 * results["disk"].kl
    check_float_weights(back, model, "packed")
    with pytest.raises(BitallocError, match="has shape"):
        check_float_weights(back, tiny_llama(), "packed")


def test_cli_scale_fold_profile_quantize_eval(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> None:
    model = ["--model", str(tiny_model_dir), "--corpus", str(text_file)]
    # profile: the fold settings are part of the cache key
    plain_path, folded_path = tmp_path / "plain.npz", tmp_path / "folded.npz"
    assert run(capsys, "profile", *model, *CALIBRATION, "--options", "rtn2", "rtn4", "--out", str(plain_path), "--no-progress")[0] == 0
    assert run(capsys, "profile", *model, *CALIBRATION, "--options", "rtn2", "rtn4", "--scale-fold", "--out", str(folded_path), "--no-progress")[0] == 0
    plain, folded = SensitivityTable.load(plain_path), SensitivityTable.load(folded_path)
    assert len(list((isolated_cache / "profiles").glob("*.npz"))) == 2
    assert plain.key.code_version == CODE_VERSION and folded.key.code_version.startswith(CODE_VERSION + "+scalefold")
    assert plain.key.digest() != folded.key.digest() and folded.metadata["scale_fold"]["alpha"] == 0.5
    assert "scale_fold" not in plain.metadata
    assert (plain.losses["hessian_err"] != folded.losses["hessian_err"]).any()
    # option weights are kept for the plain table only: the folded ones would need the folded norms
    assert cached_table_path(plain).with_suffix(".weights").is_dir()
    assert not cached_table_path(folded).with_suffix(".weights").exists()
    # solve on the folded table, quantize with the same fold, evaluate in memory and from disk
    bitmap = tmp_path / "bitmap.json"
    assert run(capsys, "solve", "--profile", str(folded_path), "--bpw", "3.5", "--out", str(bitmap))[0] == 0
    packed = tmp_path / "packed"
    code, _, _ = run(capsys, "quantize", "--bitmap", str(bitmap), "--out", str(packed), "--corpus", str(text_file), *CALIBRATION,
                     "--scale-fold", "--no-progress")
    assert code == 0
    config = json.loads((packed / CONFIG_FILE).read_text())
    assert config["schema_version"] == 2 and "model.layers.0.input_layernorm" in config["float_tensors"]
    assert config["source"]["scale_fold"]["alpha"] == 0.5
    rows_path = tmp_path / "rows.json"
    code, _, _ = run(capsys, "eval", *model, "--quantizer", "rtn", "--bits", "8", "--group-size", "32", "--bitmap", str(bitmap),
                     "--quantized", str(packed), "--scale-fold", *CALIBRATION, "--tokens", "128", "--json", str(rows_path), "--no-progress")
    assert code == 0
    data = json.loads(rows_path.read_text())
    reference, rtn8, in_memory, reloaded = data["rows"]
    assert reference["name"] == REFERENCE and data["scale_fold"]["alpha"] == 0.5
    assert rtn8["name"] == "rtn-w8g32+sf0.5" and in_memory["name"] == "bitmap:bitmap+sf0.5" and reloaded["name"] == "packed:packed"
    # 8-bit on the folded model stays at the reference: the folded norms are evaluated with it
    assert rtn8["kl"] < 1e-3 and abs(rtn8["ppl_ratio"] - 1) < 1e-2
    assert in_memory["perplexity"] == reloaded["perplexity"] and in_memory["kl"] == reloaded["kl"] > 0


@pytest.mark.parametrize(
    "args,message",
    [
        (["--quantizer", "rtn", "--scale-fold-alpha", "0.3"], "--scale-fold-alpha needs --scale-fold"),
        (["--quantizer", "none", "--scale-fold"], "--scale-fold applies to --quantizer/--bitmap"),
        (["--quantizer", "rtn", "--scale-fold", "--scale-fold-alpha", "1.5"], "must be between 0 and 1"),
        (["--quantizer", "rtn", "--scale-fold", "--scale-fold-alpha", "big"], "not a number in [0, 1] nor 'search'"),
    ],
)
def test_cli_scale_fold_bad_input(args, message, tiny_model_dir, isolated_cache, capsys) -> None:
    code, _, err = run(capsys, "eval", "--model", str(tiny_model_dir), *args)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
