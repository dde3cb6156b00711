"""Features, option specs and the profile (sensitivity table) on the tiny random llama: mechanics only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import allocator.measure.profile as profile_module
from allocator.errors import BitallocError
from allocator.measure.features import FEATURE_NAMES, FEATURE_SCHEMA, feature_matrix, measure_layer
from allocator.measure.profile import cached_table_path, profile_model
from allocator.model.arch import module_kinds
from allocator.model.calibration import InputStatistics, capture_block_inputs
from allocator.model.layers import quantizable_linears
from allocator.table.losses import HESSIAN_ERR, KL, WEIGHT_ERR
from allocator.table.options import default_options, parse_options, quantizer_from_flags, quantizer_from_settings
from allocator.table.sensitivity import SensitivityTable
from tests.conftest import WORDS

FAST_OPTIONS = ["xnor", "gptq2", "gptq4"]
PROFILE_LAYER = profile_module.profile_layer


@pytest.fixture(scope="module")
def full_table(loaded, corpus, tmp_path_factory) -> SensitivityTable:
    """The default option set plus keep8, with measured KL (not cached)."""
    return profile_model(loaded, corpus, default_options(keep=True), samples=4, seqlen=32, measure_kl=True,
                         kl_samples=2, cache=False, progress=False)


def count_layer_calls(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> list[str]:
    """Count :func:`allocator.measure.profile.profile_layer` calls (optionally interrupting after some)."""
    calls: list[str] = []

    def counting(name, *args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt
        calls.append(name)
        return PROFILE_LAYER(name, *args, **kwargs)

    monkeypatch.setattr(profile_module, "profile_layer", counting)
    return calls


# -- features -------------------------------------------------------------------------------


def layer_statistics(model) -> dict[str, tuple[torch.Tensor, InputStatistics]]:
    """(weight, input statistics) of every linear, collected on the reference model in one pass."""
    linears = quantizable_linears(model)
    stats = {name: InputStatistics(m.in_features) for name, m in linears.items()}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=name: stats[n].add(args[0])) for name, m in linears.items()]
    samples = torch.randint(2, len(WORDS) + 2, (4, 24), generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            model(samples)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (linears[name].weight, stats[name]) for name in linears}


def test_features_are_finite_documented_and_scale_free(loaded) -> None:
    stats = layer_statistics(loaded.model)
    names = list(stats)
    blocks = [int(n.split(".")[2]) for n in names]

    def measurements(weight_scale: float, act_scale: float):
        return [
            measure_layer(n, w * weight_scale, s.hessian.hessian() * act_scale**2, s.absmax * act_scale, b, 2)
            for (n, (w, s)), b in zip(stats.items(), blocks)
        ]

    features = feature_matrix(measurements(1.0, 1.0))
    assert len(FEATURE_NAMES) >= 11 and FEATURE_SCHEMA
    assert features.shape == (len(names), len(FEATURE_NAMES)) and np.isfinite(features).all()
    column = {name: features[:, i] for i, name in enumerate(FEATURE_NAMES)}
    kinds = features[:, [FEATURE_NAMES.index(f"kind_{k}") for k in ("q", "k", "v", "o", "gate", "up", "down")]]
    assert (kinds.sum(axis=1) == 1).all()  # every llama linear has exactly one kind
    assert column["relative_depth"][0] == 0 and column["relative_depth"][-1] == 1
    assert abs(column["act_log_rms"].mean()) < 1e-5  # normalized within the model
    assert (column["rtn_w2_error"] > column["rtn_w4_error"]).all()
    # A model with weights 10x and activations 3x larger is described by the same features.
    scaled = feature_matrix(measurements(10.0, 3.0))
    assert np.allclose(scaled, features, atol=2e-3)
    assert module_kinds("model.layers.3.self_attn.qkv_proj") == ("q", "k", "v")
    assert module_kinds("model.layers.3.mlp.something") == ()


# -- option specs ---------------------------------------------------------------------------


def test_default_options_and_specs() -> None:
    labels = [o.label for o in default_options(keep=True)]
    assert labels == ["xnor-g128", "billm-b128", "pbllm-s10-int8", "w1p1-g128", "gptq-w2g128", "gptq-w3g128", "gptq-w4g128", "keep8"]
    parsed = parse_options(["gptq3:group_size=64", "gptq-w4g128", "rtn8:group_size=none,symmetric=true", "dyngroup"])
    assert [o.label for o in parsed] == ["gptq-w3g64", "gptq-w4g128", "keep8", "dyngroup-g4"]
    for option in parsed:
        assert quantizer_from_settings(option.settings).settings() == dict(option.settings)
    bad_specs = (["magic"], ["gptq3:bits"], ["gptq3:nope=1"], ["gptq2", "gptq-w2g128"], ["xnor:group_size=0"],
                 ["gptq3:group_size=-1", "gptq3:group_size=none"], [])
    for bad in bad_specs:
        with pytest.raises(BitallocError):
            parse_options(bad)


def test_eval_flags_for_the_binary_family() -> None:
    assert quantizer_from_flags("xnor").label() == "xnor"
    assert quantizer_from_flags("w1p1", group_size=64, group_size_given=True).label() == "w1p1-g64"
    assert quantizer_from_flags("gptq").label() == "gptq-w3g128"
    with pytest.raises(BitallocError, match="--bits does not apply to billm"):
        quantizer_from_flags("billm", bits=2)
    with pytest.raises(BitallocError, match="--group-size does not apply to dyngroup"):
        quantizer_from_flags("dyngroup", group_size=64, group_size_given=True)
    with pytest.raises(BitallocError, match="--act-order applies to gptq only"):
        quantizer_from_flags("rtn", act_order=True)
    with pytest.raises(BitallocError, match="--sym"):
        quantizer_from_flags("pbllm", symmetric=True)


# -- the profile ----------------------------------------------------------------------------


def test_profile_table_covers_every_layer_and_option(full_table, loaded) -> None:
    table = full_table
    linears = quantizable_linears(loaded.model)
    options = default_options(keep=True)
    assert table.names == list(linears)
    assert table.labels == [o.label for o in options]
    assert table.loss_names == [HESSIAN_ERR, WEIGHT_ERR, KL]
    for i, module in enumerate(linears.values()):
        expected = [quantizer_from_settings(o.settings).storage_bits(module.out_features, module.in_features) for o in options]
        assert table.bits[i].tolist() == expected
        assert table.numel[i] == module.weight.numel()
    for loss in table.losses.values():
        assert np.isfinite(loss).all() and (loss >= 0).all()
    gptq = [table.option_index(f"gptq-w{b}g128") for b in (2, 3, 4)]
    hessian_err = table.loss(HESSIAN_ERR)
    assert (hessian_err[:, gptq[0]] > hessian_err[:, gptq[1]]).all() and (hessian_err[:, gptq[1]] > hessian_err[:, gptq[2]]).all()
    assert (hessian_err[:, table.option_index("keep8")] < hessian_err[:, gptq[2]]).all()
    assert table.features.shape == (table.num_layers, len(FEATURE_NAMES)) and np.isfinite(table.features).all()
    assert table.feature_schema == FEATURE_SCHEMA and table.feature_names == list(FEATURE_NAMES)
    # q/k/v and gate/up of each block are tied
    assert len(set(table.tie_group.tolist())) == 2 * 4
    assert table.metadata["other_bytes"] > 0 and table.key.samples == 4 and table.key.seqlen == 32


def test_hessian_err_is_the_layer_output_error(loaded, corpus, full_table) -> None:
    """tr(E H E^T) = 2 * mean over calibration tokens of ||E x||^2, for the first layer."""
    from allocator.model.tokens import calibration_samples

    tokens = calibration_samples(loaded.tokenizer, corpus.calibration, 4, 32, False, 0)
    inputs = capture_block_inputs(loaded.model, tokens)
    x = torch.cat([h.reshape(-1, h.shape[-1]) for h in inputs.hidden_states])
    layer = loaded.model.model.layers[0]
    with torch.inference_mode():
        x = layer.input_layernorm(x).double()
    name = "model.layers.0.self_attn.q_proj"
    weight = quantizable_linears(loaded.model)[name].weight.detach()
    option = full_table.options[full_table.option_index("xnor-g128")]
    error = (weight - quantizer_from_settings(option.settings).quantize(weight).dequantized).double()
    expected = 2 * ((x @ error.T) ** 2).sum(dim=1).mean().item()
    assert full_table.loss(HESSIAN_ERR)[0, full_table.option_index("xnor-g128")] == pytest.approx(expected, rel=1e-4)


def test_cached_table_is_reused_and_keyed(loaded, corpus, isolated_cache, monkeypatch) -> None:
    options = parse_options(FAST_OPTIONS)
    calls = count_layer_calls(monkeypatch)
    first = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    assert len(calls) == first.num_layers
    path = cached_table_path(first)
    assert path.is_file() and path.parent == isolated_cache / "profiles"
    again = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    assert len(calls) == first.num_layers  # nothing recomputed
    assert np.array_equal(again.bits, first.bits) and np.array_equal(again.loss(), first.loss())
    profile_model(loaded, corpus, options, samples=4, seqlen=32, seed=1, progress=False)
    assert len(calls) == 2 * first.num_layers  # another seed is another table
    profile_model(loaded, corpus, options, samples=4, seqlen=32, recompute=True, progress=False)
    assert len(calls) == 3 * first.num_layers


def test_interrupted_profile_resumes_where_it_stopped(loaded, corpus, isolated_cache, monkeypatch) -> None:
    options = parse_options(FAST_OPTIONS)
    reference = profile_model(loaded, corpus, options, samples=4, seqlen=32, cache=False, progress=False)
    count_layer_calls(monkeypatch, fail_after=9)
    with pytest.raises(KeyboardInterrupt):
        profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    partial = list((isolated_cache / "profiles").glob("*.partial"))
    assert len(partial) == 1 and len(list(partial[0].glob("model.*.json"))) == 9
    calls = count_layer_calls(monkeypatch)
    resumed = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    assert len(calls) == reference.num_layers - 9 and calls[0] == reference.names[9]
    assert not partial[0].exists()
    assert np.array_equal(resumed.bits, reference.bits)
    for name in reference.loss_names:
        assert np.allclose(resumed.loss(name), reference.loss(name), rtol=1e-12, atol=0)
    assert np.allclose(resumed.features, reference.features)


def test_profile_keeps_every_option_weight(loaded, corpus, isolated_cache) -> None:
    """The kept weights are the ones the losses describe, and a bit map assembles from them."""
    from allocator.measure.option_weights import OptionWeights

    options = parse_options(FAST_OPTIONS)
    table = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    kept = OptionWeights.beside(cached_table_path(table), table.labels)
    assert kept.missing(table.names) == []
    linears = quantizable_linears(loaded.model)
    name = table.names[0]
    # XNOR (the first option) needs no Hessian: its kept weight is what quantizing the reference gives.
    label = table.labels[0]
    expected = quantizer_from_settings(table.options[0].settings).quantize(linears[name].weight.detach().float()).dequantized
    assert torch.equal(kept.load(name, label), expected)  # the stored form decodes bit-identically
    # on disk: the options' stored forms (their honest bits) and a small header, not a float copy per option
    stored_bytes = int(table.bits[0].sum()) // 8
    assert stored_bytes <= kept.path(name).stat().st_size <= stored_bytes + 8192
    assert stored_bytes < 0.5 * len(table.labels) * linears[name].weight.numel() * 2
    weights = kept.assemble({n: table.labels[-1] for n in table.names})
    assert set(weights) == set(table.names)
    error = (weights[name].double() - linears[name].weight.double())
    assert error.abs().max() > 0  # a quantized weight, not the reference
    # Deleting one layer's weights makes the cached table incomplete: the next call redoes it.
    kept.path(table.names[3]).unlink()
    with pytest.raises(BitallocError, match="no kept weights"):
        kept.assemble({table.names[3]: label})
    again = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    assert kept.missing(table.names) == [] and np.array_equal(again.bits, table.bits)


def test_gptq_by_rtn_prices_gptq_options_on_their_rtn_twins(loaded, corpus, isolated_cache) -> None:
    from allocator.measure.option_weights import OptionWeights
    from allocator.measure.proxies import rtn_twin_settings

    options = parse_options(["xnor", "gptq2:clip=mse", "gptq4"])
    own = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    priced = profile_model(loaded, corpus, options, samples=4, seqlen=32, gptq_by_rtn=True, progress=False)
    assert cached_table_path(priced) != cached_table_path(own) and priced.key != own.key
    assert priced.metadata["gptq_by_rtn"] is True and "gptq_by_rtn" not in own.metadata
    assert priced.options == own.options and np.array_equal(priced.bits, own.bits)  # the options stay GPTQ, at GPTQ's bits
    kept = OptionWeights.beside(cached_table_path(priced), priced.labels)
    weight = quantizable_linears(loaded.model)[priced.names[0]].weight.detach().float()
    for option in priced.options[1:]:
        twin = rtn_twin_settings(option.settings)
        assert twin["quantizer"] == "rtn" and twin["bits"] == option.settings["bits"]
        assert twin.get("clip", "minmax") == option.settings.get("clip", "minmax")
        if twin.get("clip", "minmax") == "minmax":  # (mse clipping weighs its search by diag(H), which RTN gets in the profile too)
            expected = quantizer_from_settings(twin).quantize(weight).dequantized
            assert torch.equal(kept.load(priced.names[0], option.label), expected)
    # xnor is no GPTQ option: priced by itself in both tables; GPTQ's error is below its RTN twin's summed over layers
    assert np.allclose(priced.loss(HESSIAN_ERR)[:, 0], own.loss(HESSIAN_ERR)[:, 0])
    assert (priced.loss(HESSIAN_ERR)[:, 1:].sum(axis=0) > own.loss(HESSIAN_ERR)[:, 1:].sum(axis=0)).all()
