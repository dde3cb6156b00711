"""Fisher diagonals from one gradient pass and the Fisher-weighted losses, on the tiny random llama."""

from __future__ import annotations

import pytest
import torch

import allocator.measure.fisher as fisher_module
from allocator.measure.fisher import EMPIRICAL, SAMPLED, cached_fisher, fisher_diagonals
from allocator.measure.profile import KLProbe
from allocator.model.layers import quantizable_linears
from allocator.model.tokens import calibration_samples
from tests.conftest import random_text, tiny_llama, tiny_tokenizer

ACCUMULATE = fisher_module.accumulate_window


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

    monkeypatch.setattr(fisher_module, "accumulate_window", counting)
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
    monkeypatch.setattr(fisher_module, "CHECKPOINT_EVERY", 2)
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

