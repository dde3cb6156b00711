"""Single-layer KL from kept weights and the KL-calibrated loss, on the tiny random llama."""

from __future__ import annotations

import numpy as np
import pytest

import allocator.measure.layer_kl as layer_kl
from allocator.errors import BitallocError
from allocator.measure.layer_kl import KL_ESTIMATE_ANCHORS, add_kl_losses, calibrated_kl, layer_gains
from allocator.measure.profile import cached_table_path, profile_model
from allocator.solvers import Budget, Constraints, solve
from allocator.table.losses import HESSIAN_ERR, KL, KL_CALIBRATED, KL_MEASURED
from allocator.table.options import parse_options
from allocator.table.sensitivity import SensitivityTable

OPTIONS = ["xnor", "gptq2", "gptq4"]


def test_gain_is_the_geometric_mean_ratio_and_calibrates_every_option() -> None:
    herr = np.array([[8.0, 2.0, 1.0], [40.0, 10.0, np.nan]])
    kl = np.array([[np.nan, 4.0, 1.0], [np.nan, 0.5, np.nan]])
    gains = layer_gains(herr, kl)
    assert np.allclose(gains, [np.sqrt(2.0 * 1.0), 0.05])
    est = calibrated_kl(herr, kl)
    assert np.allclose(est[0], gains[0] * herr[0]) and np.isclose(est[1, 0], 2.0) and np.isnan(est[1, 2])
    with pytest.raises(BitallocError, match="layer 1"):
        layer_gains(herr, np.array([[1.0, np.nan, np.nan], [np.nan, np.nan, np.nan]]))


def test_kept_weight_kl_matches_the_inline_measurement(loaded, corpus, isolated_cache) -> None:
    """Measured from the kept (fp16) weights on the same windows, the KL is the profile's own."""
    options = parse_options(OPTIONS)
    inline = profile_model(loaded, corpus, options, samples=4, seqlen=32, measure_kl=True, kl_samples=2, cache=False, progress=False)
    table = profile_model(loaded, corpus, options, samples=4, seqlen=32, progress=False)
    path = cached_table_path(table)
    measured = add_kl_losses(loaded, table, path, corpus.calibration, windows=2, seqlen=32, progress=False)
    assert np.allclose(measured.loss(KL_MEASURED), inline.loss(KL), rtol=0.05, atol=1e-6)
    assert np.isfinite(measured.loss(KL_CALIBRATED)).all()
    reloaded = SensitivityTable.load(path)  # the cached table now carries the losses
    assert {KL_MEASURED, KL_CALIBRATED} <= set(reloaded.loss_names)
    measurement = dict(reloaded.metadata["kl_measurement"])
    assert measurement.pop("seconds") > 0 and measurement == {"windows": 2, "seqlen": 32, "anchors": "all"}
    bitmap = solve(reloaded, Budget.bpw(3.0), Constraints(loss=KL_CALIBRATED))
    assert bitmap.loss_name == KL_CALIBRATED and bitmap.predicted_bpw <= 3.0 + 1e-9


def test_anchors_measure_only_their_columns_and_resume(loaded, corpus, isolated_cache, monkeypatch) -> None:
    table = profile_model(loaded, corpus, parse_options(OPTIONS), samples=4, seqlen=32, progress=False)
    path = cached_table_path(table)
    anchor = table.labels[1]
    monkeypatch.setattr(layer_kl, "CHECKPOINT_EVERY", 2)
    calls = []
    original = layer_kl.measure_kept_kl

    def interrupted(probe, *args, **kwargs):
        real = probe.mean_kl

        def counting(overlay):
            if len(calls) == 5:
                raise KeyboardInterrupt
            calls.append(next(iter(overlay)))
            return real(overlay)

        probe.mean_kl = counting
        return original(probe, *args, **kwargs)

    monkeypatch.setattr(layer_kl, "measure_kept_kl", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_kl_losses(loaded, table, path, corpus.calibration, anchors=[anchor], windows=1, seqlen=16, progress=False)
    assert len(list(path.parent.glob("*.kl-*.npy"))) == 1  # four layers were saved before the stop
    monkeypatch.setattr(layer_kl, "measure_kept_kl", original)
    calls.clear()
    result = add_kl_losses(loaded, table, path, corpus.calibration, anchors=[anchor], windows=1, seqlen=16, progress=False)
    kl = result.loss(KL_MEASURED)
    column = table.labels.index(anchor)
    assert np.isfinite(kl[:, column]).all() and np.isnan(np.delete(kl, column, axis=1)).all()
    est = result.loss(KL_CALIBRATED)
    assert np.allclose(est[:, column], kl[:, column])  # one anchor: the estimate reproduces it exactly
    assert np.allclose(est / result.loss(HESSIAN_ERR), (kl[:, column] / result.loss(HESSIAN_ERR)[:, column])[:, None])
    assert not list(path.parent.glob("*.kl-*.npy"))
    with pytest.raises(BitallocError, match="not in this profile"):
        add_kl_losses(loaded, table, path, corpus.calibration, anchors=["gptq3"], progress=False)


def test_a_table_measured_on_every_option_serves_an_anchor_request_without_measuring(loaded, corpus, isolated_cache, monkeypatch) -> None:
    """kl_est asked of one anchor is that anchor's calibration, even where every option's KL is already measured."""
    table = profile_model(loaded, corpus, parse_options(OPTIONS), samples=4, seqlen=32, progress=False)
    path = cached_table_path(table)
    every = add_kl_losses(loaded, table, path, corpus.calibration, windows=1, seqlen=16, progress=False)
    assert every.metadata[KL_ESTIMATE_ANCHORS] == "all"
    anchor = table.labels[1]

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(layer_kl, "measure_kept_kl", no_measuring)
    served = add_kl_losses(loaded, every, path, corpus.calibration, anchors=[anchor], windows=1, seqlen=16, progress=False)
    kl = every.loss(KL_MEASURED)
    only_anchor = np.where(np.array(table.labels) == anchor, kl, np.nan)
    assert np.allclose(served.loss(KL_CALIBRATED), calibrated_kl(every.loss(HESSIAN_ERR), only_anchor))
    assert not np.allclose(served.loss(KL_CALIBRATED), every.loss(KL_CALIBRATED))
    assert np.array_equal(served.loss(KL_MEASURED), kl, equal_nan=True)  # every option's measurement is kept
    reloaded = SensitivityTable.load(path)
    assert reloaded.metadata[KL_ESTIMATE_ANCHORS] == [anchor] and reloaded.metadata["kl_measurement"]["anchors"] == "all"
    again = add_kl_losses(loaded, served, path, corpus.calibration, windows=1, seqlen=16, progress=False)
    assert np.allclose(again.loss(KL_CALIBRATED), every.loss(KL_CALIBRATED))  # and back, still without measuring


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kl_probe_runs_only_the_blocks_an_overlay_changes(family) -> None:
    """The block-wise shortcut gives the whole forward's KL, for a change in any block or outside them."""
    import torch

    from allocator.measure.profile import KLProbe
    from tests.conftest import tiny_llama
    from tests.test_scalefold import tiny_gemma3

    model = tiny_llama() if family == "llama" else tiny_gemma3()
    vocab = model.config.vocab_size
    windows = torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    probe = KLProbe(model, windows)
    assert probe._block_inputs is not None  # the shortcut reproduced the reference, so it is used
    whole = KLProbe(model, windows)
    whole._block_inputs = None
    generator = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        weight = model.get_submodule(name).weight
        overlay = {name: weight + 5.0 * weight.abs().mean() * torch.randn(weight.shape, generator=generator)}
        expected = whole.mean_kl(overlay)
        assert expected > 1e-5
        assert probe.mean_kl(overlay) == pytest.approx(expected, rel=1e-4, abs=1e-9)
    two = {"model.layers.1.mlp.up_proj": model.model.layers[1].mlp.up_proj.weight * 1.5,
           "model.layers.0.mlp.up_proj": model.model.layers[0].mlp.up_proj.weight * 0.5}
    assert probe._first_block(two) == 0 and probe.mean_kl(two) == pytest.approx(whole.mean_kl(two), rel=1e-4)
    # outside the blocks (the embedding here) the whole forward runs
    embedding = {"model.embed_tokens": model.model.embed_tokens.weight * 1.5}
    assert probe._first_block(embedding) is None and probe._first_block(two | {"lm_head": model.lm_head.weight}) is None
    assert probe.mean_kl(embedding) == pytest.approx(whole.mean_kl(embedding), rel=1e-4) and whole.mean_kl(embedding) > 1e-5


def test_kl_around_an_allocation_is_the_whole_allocation_s_kl_increase(loaded, corpus, isolated_cache) -> None:
    """kl_local[l, o] is KL(base with layer l at o) - KL(base), both measured on the whole quantized model; 0 at the base."""
    from allocator.measure.layer_kl import with_kl_around
    from allocator.measure.option_weights import OptionWeights
    from allocator.measure.profile import KLProbe
    from allocator.model.tokens import calibration_samples
    from allocator.table.losses import KL_LOCAL

    table = profile_model(loaded, corpus, parse_options(OPTIONS), samples=4, seqlen=32, progress=False)
    path = cached_table_path(table)
    base = {name: table.labels[-1 - (i % 2)] for i, name in enumerate(table.names)}  # gptq4 and gptq2, alternating
    local = with_kl_around(loaded, table, path, corpus.calibration, base, windows=2, seqlen=16, progress=False).loss(KL_LOCAL)
    at_base = np.array([[label == base[name] for label in table.labels] for name in table.names])
    assert np.all(local[at_base] == 0.0) and np.isfinite(local).all()
    weights = OptionWeights.beside(path, table.labels)
    tokens = calibration_samples(loaded.tokenizer, corpus.calibration, 4, 32, loaded.add_bos, table.key.seed)[:2, :16]
    whole = KLProbe(loaded.model, tokens)  # no base: the allocation given whole, as an overlay
    base_kl = whole.mean_kl(weights.assemble(base))
    assert KLProbe(loaded.model, tokens, base=weights.assemble(base))._block_inputs is not None  # the shortcut holds on the base
    for row, column in ((0, 0), (len(table.names) - 1, 0), (len(table.names) // 2, 1)):
        name = table.names[row]
        switched = weights.assemble({**base, name: table.labels[column]})
        assert np.isclose(local[row, column], whole.mean_kl(switched) - base_kl, rtol=1e-3, atol=1e-6)
    with pytest.raises(BitallocError, match="every profiled layer"):
        with_kl_around(loaded, table, path, corpus.calibration, {table.names[0]: table.labels[0]}, progress=False)
