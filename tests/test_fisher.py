"""Fisher diagonals from one gradient pass and the Fisher-weighted losses, on the tiny random llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import allocator.measure.fisher_gradients as gradients_module
from allocator.errors import BitallocError
from allocator.measure.fisher import cached_fisher, fisher_diagonals
from allocator.measure.fisher_gradients import CHUNK_WINDOWS, EMPIRICAL, SAMPLED
from allocator.measure.fisher_losses import add_fisher_losses, fisher_windows
from allocator.measure.option_weights import OptionWeights
from allocator.measure.profile import KLProbe, cached_table_path, profile_model
from allocator.model.layers import quantizable_linears
from allocator.model.tokens import calibration_samples
from allocator.table.losses import FISHER, FISHER_EMPIRICAL, HESSIAN_ERR
from allocator.table.options import parse_options
from allocator.table.sensitivity import SensitivityTable
from tests.cli_helpers import assert_one_line_error, run
from tests.conftest import random_text, tiny_llama, tiny_tokenizer

ACCUMULATE = gradients_module.accumulate_window


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's products are too small to share: on a busy 2-core machine a second thread makes them ~50x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return calibration_samples(tiny_tokenizer(), random_text(seed=3), 16, 64, add_bos=False, seed=0)


@pytest.fixture(scope="module")
def diagonals(model, windows):
    return fisher_diagonals(model, windows, seed=0, progress=False)


def as_bytes(diagonal: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: t.numpy().tobytes() for name, t in diagonal.items()}


def count_windows(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None) -> list[int]:
    """Count the windows the pass runs (optionally interrupting it once, after ``fail_after``)."""
    calls: list[int] = []
    interrupt = [fail_after]

    def counting(*args, **kwargs):
        if interrupt[0] is not None and len(calls) == interrupt[0]:
            interrupt[0] = None
            raise KeyboardInterrupt
        calls.append(1)
        return ACCUMULATE(*args, **kwargs)

    monkeypatch.setattr(gradients_module, "accumulate_window", counting)
    return calls


@pytest.mark.parametrize("layer", ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"])
def test_half_fisher_weighted_error_is_the_measured_mean_kl(model, windows, diagonals, layer) -> None:
    """KL(ref || W + δ) ≈ ½ Σ F δ² per token, and both scale as |δ|² (the Fisher is the per-token average's)."""
    weight = quantizable_linears(model)[layer].weight.detach()
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * weight.std()
    probe = KLProbe(model, windows)
    measured = {eps: probe.mean_kl({layer: weight + eps * direction}) for eps in (0.1, 0.2)}
    assert 3.5 < measured[0.2] / measured[0.1] < 4.5  # quadratic in the perturbation
    for variant in (SAMPLED, EMPIRICAL):
        predicted = 0.5 * float((diagonals[variant].diagonal[layer] * (0.1 * direction) ** 2).sum())
        assert 0.5 < predicted / measured[0.1] < 2.0, (variant, predicted, measured[0.1])
    assert diagonals[SAMPLED].tokens == windows.shape[0] * (windows.shape[1] - 1)
    assert diagonals[SAMPLED].forward_passes == 16 and diagonals[SAMPLED].backward_passes == 32


def test_the_pass_is_deterministic_under_its_seed_and_leaves_the_model_as_it_was(model, windows, diagonals) -> None:
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    again = fisher_diagonals(model, windows, seed=0, progress=False)
    assert as_bytes(again[SAMPLED].diagonal) == as_bytes(diagonals[SAMPLED].diagonal)
    assert as_bytes(again[EMPIRICAL].diagonal) == as_bytes(diagonals[EMPIRICAL].diagonal)
    other = fisher_diagonals(model, windows, seed=1, progress=False)
    assert as_bytes(other[EMPIRICAL].diagonal) == as_bytes(diagonals[EMPIRICAL].diagonal)  # the text's labels take no seed
    assert as_bytes(other[SAMPLED].diagonal) != as_bytes(diagonals[SAMPLED].diagonal)
    alone = fisher_diagonals(model, windows, variants=[SAMPLED], seed=0, progress=False)
    assert list(alone) == [SAMPLED] and as_bytes(alone[SAMPLED].diagonal) == as_bytes(diagonals[SAMPLED].diagonal)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_an_interrupted_pass_resumes_to_the_same_bytes(model, windows, diagonals, isolated_cache, monkeypatch) -> None:
    assert CHUNK_WINDOWS == 4  # a checkpoint after every chunk
    calls = count_windows(monkeypatch, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        cached_fisher(model, "tiny", "random", windows, seed=0, progress=False)
    assert len(list((isolated_cache / "fisher").glob("*.partial.safetensors"))) == 1  # windows 0-3 saved
    calls.clear()
    resumed = cached_fisher(model, "tiny", "random", windows, seed=0, progress=False)
    assert len(calls) == 16 - 4
    for variant in (SAMPLED, EMPIRICAL):
        assert as_bytes(resumed[variant].diagonal) == as_bytes(diagonals[variant].diagonal)
        assert resumed[variant].windows == 16 and resumed[variant].tokens == diagonals[variant].tokens
    assert not list((isolated_cache / "fisher").glob("*.partial.safetensors"))
    calls.clear()
    cached = cached_fisher(model, "tiny", "random", windows, variants=[EMPIRICAL], seed=0, progress=False)
    assert not calls and as_bytes(cached[EMPIRICAL].diagonal) == as_bytes(diagonals[EMPIRICAL].diagonal)
    cached_fisher(model, "tiny", "random", windows[:8], variants=[SAMPLED], seed=0, progress=False)
    assert len(calls) == 8  # other windows: another cache entry


@pytest.fixture
def table_path(loaded, corpus, isolated_cache):
    table = profile_model(loaded, corpus, parse_options(["rtn2", "rtn3", "rtn4"]), samples=4, seqlen=32, progress=False)
    return cached_table_path(table)


def test_fisher_losses_are_half_the_fisher_weighted_error_of_the_kept_weights(loaded, corpus, table_path, monkeypatch) -> None:
    table = SensitivityTable.load(table_path)
    kept = OptionWeights.beside(table_path, table.labels)
    layer, absent = table.names[3], table.names[5]
    weight = quantizable_linears(loaded.model)[layer].weight.detach()
    step = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    # errors δ, 2δ, 3δ, written as a cache of the older format (one fp16 weight per option), which is still read
    save_file({label: (weight + (j + 1) * step).half().contiguous() for j, label in enumerate(table.labels)}, str(kept.path(layer)))
    kept.path(absent).unlink()
    result = add_fisher_losses(loaded, table, table_path, corpus.calibration, windows=3, seqlen=24, progress=False)
    sampled, empirical = result.loss(FISHER), result.loss(FISHER_EMPIRICAL)
    for loss in (sampled, empirical):
        row = table.names.index(absent)
        assert np.isnan(loss[row]).all() and np.isfinite(np.delete(loss, row, axis=0)).all()
        constructed = loss[table.names.index(layer)]
        assert np.allclose(constructed / constructed[0], [1.0, 4.0, 9.0], rtol=1e-3)  # fp16 storage of the kept weights
        finite = np.isfinite(loss).all(axis=1) & (np.array(table.names) != layer)
        assert (loss[finite, 0] > loss[finite, 1]).all() and (loss[finite, 1] > loss[finite, 2]).all()  # rtn 2 > 3 > 4 bits
    fisher = fisher_diagonals(loaded.model, fisher_windows(loaded, table, corpus.calibration, 3, 24), variants=[SAMPLED], seed=0, progress=False)
    name = table.names[0]
    error = quantizable_linears(loaded.model)[name].weight.detach().double() - kept.load(name, "rtn-w3g128").double()
    assert np.isclose(sampled[0, 1], 0.5 * float((fisher[SAMPLED].diagonal[name].double() * error**2).sum()), rtol=1e-6)
    reloaded = SensitivityTable.load(table_path)  # saved back, beside the kept weights
    assert {HESSIAN_ERR, FISHER, FISHER_EMPIRICAL} <= set(reloaded.loss_names) and reloaded.default_loss == HESSIAN_ERR
    settings = reloaded.metadata["fisher"]
    assert (settings["windows"], settings["seqlen"], settings["seed"], settings["tokens"]) == (3, 24, 0, 3 * 23)
    assert settings["seconds"] > 0 and settings["forward_passes"][SAMPLED] == 3 and settings["backward_passes"][SAMPLED] == 6
    assert {FISHER, FISHER_EMPIRICAL} <= set(reloaded.metadata["losses"])
    calls = count_windows(monkeypatch)
    assert add_fisher_losses(loaded, reloaded, table_path, corpus.calibration, windows=3, seqlen=24, progress=False) is reloaded
    again = add_fisher_losses(loaded, reloaded, table_path, corpus.calibration, windows=2, seqlen=24, variants=[SAMPLED], progress=False)
    assert len(calls) == 2 and FISHER_EMPIRICAL not in again.losses  # other settings: the stale loss goes
    with pytest.raises(BitallocError, match="1 to 4 windows"):
        add_fisher_losses(loaded, reloaded, table_path, corpus.calibration, windows=5, progress=False)


def test_a_table_without_kept_weights_is_refused(loaded, corpus, isolated_cache) -> None:
    table = profile_model(loaded, corpus, parse_options(["rtn3"]), samples=2, seqlen=16, keep_weights=False, progress=False)
    with pytest.raises(BitallocError, match="no kept option weights"):
        add_fisher_losses(loaded, table, cached_table_path(table), corpus.calibration, windows=1, progress=False)


def test_profile_fisher_through_the_cli(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> None:
    out = tmp_path / "table.npz"
    model = ["--model", str(tiny_model_dir), "--corpus", str(text_file), "--samples", "2", "--seqlen", "16"]
    code, stdout, _ = run(capsys, "profile", *model, "--options", "rtn2", "rtn4", "--fisher", "--fisher-samples", "2",
                          "--out", str(out), "--no-progress")
    assert code == 0 and "fisher, fisher_emp" in stdout
    assert SensitivityTable.load(out).metadata["fisher"]["seqlen"] == 16
    code, _, err = run(capsys, "solve", "--profile", str(out), "--bpw", "3.0", "--loss", "fisher")
    assert code == 0 and "predicted fisher" in err
    for args, message in [(["--fisher-samples", "2"], "--fisher-samples only applies with --fisher"),
                          (["--fisher", "--scale-fold"], "a --scale-fold profile does not keep"),
                          (["--fisher", "--fisher-samples", "3"], "1 to 2 windows of 2 to 16 tokens (--samples, --seqlen), got 3 x 16"),
                          (["--fisher", "--fisher-seqlen", "17"], "got 2 x 17")]:
        code, _, err = run(capsys, "profile", *model, "--options", "rtn2", *args)
        assert_one_line_error(code, err, message)
