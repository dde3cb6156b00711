"""The loss model (policies/loss_model.py): fit, predict, store; refusals in one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from allocator.errors import BitallocError
from allocator.solvers import Budget, Constraints, solve
from allocator.table.sensitivity import SensitivityTable
from policies.loss_model import FISHER_INPUT, FISHER_TWIN_LOSS, LEARNED_LOSS, LossModel, fit_loss_model, with_learned_loss

ANCHOR = "gptq-w3g128"
BETA = np.array([0.8, -0.5, 0.3, 0.0, 0.2, -0.1])
OFFSETS = np.array([3.0, 1.5, 0.0, -1.4, -4.0])
PASS = (4, 128)


def pair(seed: int, noise: float = 0.0) -> tuple[SensitivityTable, SensitivityTable]:
    """A measured table whose log KL is ``features @ BETA + fisher + offset[o]`` and its features table, which carries
    the features and the Fisher twin error (whose log at the anchor is half the level)."""
    base = SensitivityTable.synthetic(num_layers=35, seed=seed, loss_names=("kl",), num_features=len(BETA))
    rng = np.random.default_rng(seed + 100)
    hidden = rng.standard_normal(base.num_layers)
    level = base.features.astype(np.float64) @ BETA + hidden
    kl = np.exp(level[:, None] + OFFSETS[None, :] + noise * rng.standard_normal(base.bits.shape))
    fisher = np.exp(hidden[:, None] + OFFSETS[None, :])
    measured = dataclasses.replace(base, losses={"kl": kl})
    features = dataclasses.replace(base, losses={FISHER_TWIN_LOSS: fisher, "flat": np.ones_like(kl)})
    return measured, features


def test_recovers_levels_and_offsets_on_a_new_model() -> None:
    model = fit_loss_model([pair(0), pair(1)], use_fisher=True, anchor=ANCHOR, fisher_pass=PASS)
    measured, features = pair(7)
    predicted = model.predict(features)
    truth = measured.losses["kl"]
    assert np.corrcoef(np.log(predicted).ravel(), np.log(truth).ravel())[0, 1] > 0.99
    assert model.offsets[ANCHOR] == 0.0
    np.testing.assert_allclose([model.offsets[label] for label in measured.labels], OFFSETS, atol=1e-9)
    assert model.uses_fisher and model.inputs[-1] == FISHER_INPUT and len(model.trained_on) == 2
    assert (model.fisher_windows, model.fisher_seqlen) == PASS


def test_without_fisher_the_hidden_part_is_missed() -> None:
    with_fisher = fit_loss_model([pair(0), pair(1)], use_fisher=True, anchor=ANCHOR, fisher_pass=PASS)
    without = fit_loss_model([pair(0), pair(1)], use_fisher=False, anchor=ANCHOR)
    measured, features = pair(7)
    truth = np.log(measured.losses["kl"][:, 2])

    def corr(model: LossModel) -> float:
        return float(np.corrcoef(np.log(model.predict(features)[:, 2]), truth)[0, 1])

    assert corr(without) < corr(with_fisher) - 0.2


def test_inputs_are_chosen_by_held_out_error() -> None:
    from policies.loss_model import candidate_inputs

    noisy = [pair(seed) for seed in (0, 1)]
    noisy = [(dataclasses.replace(m, losses={"kl": m.losses["kl"] / np.exp(m.features.astype(np.float64) @ BETA)[:, None]}), f)
             for m, f in noisy]  # the level is the Fisher part alone: the features only add variance
    assert fit_loss_model(noisy, anchor=ANCHOR, fisher_pass=PASS).inputs == (FISHER_INPUT,)
    assert fit_loss_model([pair(0), pair(1)], anchor=ANCHOR, fisher_pass=PASS).inputs[:-1] == tuple(pair(0)[1].feature_names)
    names = ["relative_depth", "kind_q", "other"]
    sets = {"all": None, "depth": ("relative_depth",), "absent": ("kind_up",), "again": ("relative_depth",)}
    assert candidate_inputs(names, False, sets) == {"all": tuple(names), "depth": ("relative_depth",)}  # empty and repeated sets dropped
    assert candidate_inputs(names, True, {"absent": ("kind_up",)}) == {"absent": (FISHER_INPUT,)}
    with pytest.raises(BitallocError, match="candidate input sets"):
        candidate_inputs(names, False, {"absent": ("kind_up",)})


def test_learned_loss_is_the_default_and_solves_within_budget() -> None:
    model = fit_loss_model([pair(0, noise=0.2)], anchor=ANCHOR, fisher_pass=PASS)
    _, features = pair(3)
    table = with_learned_loss(features, model)
    assert table.loss_names[0] == LEARNED_LOSS
    bitmap = solve(table, Budget.bpw(3.0), Constraints(loss=LEARNED_LOSS))
    assert bitmap.total_bits <= Budget.bpw(3.0).max_bits(table.total_numel)


def test_save_load_round_trip_and_refusals(tmp_path) -> None:
    model = fit_loss_model([pair(0), pair(1)], anchor=ANCHOR, fisher_pass=PASS)
    path = model.save(tmp_path / "loss.json")
    again = LossModel.load(path)
    _, features = pair(5)
    np.testing.assert_array_equal(again.predict(features), model.predict(features))
    data = json.loads(path.read_text())
    for change in ({"version": "other"}, {"coef": data["coef"][:-1]}, {"mean": [float("nan")] * len(data["mean"])},
                   {"scale": [0.0] * len(data["scale"])}, {"inputs": "f0"}, {"offsets": {}}, {"intercept": True},
                   {"fisher_windows": 0}, {"fisher_seqlen": -1}, {"options": data["options"][:-1]},
                   {"options": [{**data["options"][0], "settings": {"bits": [3]}}, *data["options"][1:]]}):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**data, **change}))
        with pytest.raises(BitallocError) as info:
            LossModel.load(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(BitallocError, match="no loss model"):
        LossModel.load(tmp_path / "missing.json")


def test_refuses_tables_it_cannot_price() -> None:
    model = fit_loss_model([pair(0), pair(1)], anchor=ANCHOR, fisher_pass=PASS)
    _, features = pair(2)
    with pytest.raises(BitallocError, match="feature schema"):
        model.predict(dataclasses.replace(features, feature_schema="other"))
    with pytest.raises(BitallocError, match="fisher_twin"):
        model.predict(dataclasses.replace(features, losses={"flat": features.losses["flat"]}))
    renamed = dataclasses.replace(features, options=[dataclasses.replace(o, label=f"x-{o.label}") for o in features.options])
    with pytest.raises(BitallocError, match="no offset"):
        model.predict(renamed)
    with pytest.raises(BitallocError, match="at least one"):
        fit_loss_model([])
    with pytest.raises(BitallocError, match="one Fisher pass"):
        fit_loss_model([pair(0)], use_fisher=True, anchor=ANCHOR)  # tables without a Fisher pass recorded


def test_a_shipped_loss_model_loads_by_name(tmp_path, monkeypatch) -> None:
    import policies.pretrained as pretrained
    from policies.loss_model import load_loss_model, shipped_loss_models

    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)
    model = fit_loss_model([pair(0), pair(1)], anchor=ANCHOR, fisher_pass=PASS)
    model.save(tmp_path / "mine.json")
    (tmp_path / "policy.json").write_text('{"schema_version": 1}')  # a policy sidecar is not a loss model
    assert shipped_loss_models() == ["mine"]
    _, features = pair(4)
    np.testing.assert_array_equal(load_loss_model("mine").predict(features), model.predict(features))
    with pytest.raises(BitallocError, match="shipped name: mine"):
        load_loss_model("other")
