"""The features pass, the prior losses, and features-only policies (observe a features table, rewarded on a
measured one), on the tiny model: mechanics only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from allocator.errors import BitallocError
from allocator.measure import features_pass
from allocator.measure.features_pass import CHEAP_LOSS, SHAPE_LOSS, features_table, features_table_path
from allocator.measure.profile import profile_model
from allocator.solvers import Budget, Constraints, solve
from allocator.table.bitmap import BitMap
from allocator.table.options import parse_options
from allocator.table.prior_losses import ENDS_WEIGHT, KIND_WEIGHT, PRIOR_LOSSES
from allocator.table.sensitivity import FEATURES_PASS_KEY, SensitivityTable
from envs.bitalloc_env import BitAllocEnv
from envs.observation import FEATURES_OBSERVATION_VERSION
from policies.apply import apply_policy
from policies.artifact import load_policy, read_card
from policies.sac import TrainConfig, train
from tests.cli_helpers import assert_one_line_error, run

OPTIONS = ["xnor:group_size=16", "w1p1:group_size=16", "gptq2:group_size=16", "gptq4:group_size=16"]


@pytest.fixture(scope="module")
def features(loaded, corpus) -> SensitivityTable:
    return features_table(loaded, corpus, parse_options(OPTIONS), samples=2, seqlen=32, cache=False, progress=False)


def measured_twin(table: SensitivityTable, seed: int = 0) -> SensitivityTable:
    """A stand-in for the measured profile of the same model: same layers, options and bits, other losses."""
    rng = np.random.default_rng(seed)
    kl = table.losses[CHEAP_LOSS] * np.exp(rng.normal(0, 1, size=(table.num_layers, 1)))
    metadata = {k: v for k, v in table.metadata.items() if k != FEATURES_PASS_KEY}
    return dataclasses.replace(table, losses={"kl": kl}, metadata=metadata)


def test_features_table_prices_every_option_at_its_own_bits_and_holds_no_measured_loss(features, loaded, corpus) -> None:
    assert features.features_only and features.default_loss == SHAPE_LOSS
    assert set(features.loss_names) == {SHAPE_LOSS, CHEAP_LOSS, "weight_err", *PRIOR_LOSSES}
    flat, shape = features.losses["flat"], features.losses[SHAPE_LOSS]
    widest = features.bits.argmax(axis=1)
    rows = np.arange(features.num_layers)
    assert np.allclose(shape[rows, widest], flat[rows, widest])  # the flat rule's scale, the twins' ratios
    assert np.allclose(shape / shape[rows, widest][:, None], features.losses[CHEAP_LOSS] / features.losses[CHEAP_LOSS][rows, widest][:, None])
    profiled = profile_model(loaded, corpus, parse_options(OPTIONS), samples=2, seqlen=32, cache=False, progress=False, keep_weights=False)
    assert not profiled.features_only
    assert profiled.names == features.names and np.array_equal(profiled.bits, features.bits)
    assert np.isfinite(features.losses[CHEAP_LOSS]).all() and (features.losses[CHEAP_LOSS] >= 0).all()
    bpw = features.bpw
    for name in ("gptq-w2g16", "gptq-w4g16"):  # more bits of the same grid, less error, on every layer
        assert name in features.labels
    two, four = features.option_index("gptq-w2g16"), features.option_index("gptq-w4g16")
    assert (features.losses[CHEAP_LOSS][:, four] < features.losses[CHEAP_LOSS][:, two]).all() and (bpw[:, four] > bpw[:, two]).all()


def test_features_table_is_cached_and_reloaded_without_a_forward(loaded, corpus, isolated_cache, monkeypatch) -> None:
    first = features_table(loaded, corpus, parse_options(OPTIONS), samples=2, seqlen=32, progress=False)
    assert features_table_path(first).is_file()

    def no_work(*_args, **_kwargs):
        raise AssertionError("the cached features table was recomputed")

    monkeypatch.setattr(features_pass, "_measure_layers", no_work)
    again = features_table(loaded, corpus, parse_options(OPTIONS), samples=2, seqlen=32, progress=False)
    assert again.key == first.key and np.array_equal(again.losses[CHEAP_LOSS], first.losses[CHEAP_LOSS])


def test_prior_rules_weigh_the_end_blocks_and_the_heavy_kinds(features) -> None:
    depth = features.features[:, features.feature_names.index("relative_depth")]
    flat, ends, kind = (features.losses[name] for name in ("flat", "ends_first", "module_kind"))
    ratio = ends[:, 0] / flat[:, 0]
    assert np.allclose(ratio[(depth == depth.min()) | (depth == depth.max())], ENDS_WEIGHT)
    assert np.allclose(ratio[(depth > depth.min()) & (depth < depth.max())], 1.0)
    heavy = np.array([name.endswith(("v_proj", "down_proj")) for name in features.names])
    assert np.allclose((kind[:, 0] / flat[:, 0])[heavy], KIND_WEIGHT) and np.allclose((kind[:, 0] / flat[:, 0])[~heavy], 1.0)
    bitmap = solve(features, Budget.bpw(3.0), Constraints(loss="module_kind", tie=False))
    width = {name: entry.storage_bits / entry.numel for name, entry in bitmap.modules.items()}
    for block in {name.rsplit(".", 2)[0] for name in features.names}:  # v never gets fewer bits than q of its block
        assert width[f"{block}.self_attn.v_proj"] >= width[f"{block}.self_attn.q_proj"] - 1e-9


def test_env_observes_the_features_table_and_rewards_on_the_measured_one(features) -> None:
    measured = measured_twin(features)
    env = BitAllocEnv(features, constraints=Constraints(loss=CHEAP_LOSS), reward_tables=[measured], reward_loss="kl")
    assert env.observation_version == FEATURES_OBSERVATION_VERSION
    env.reset(seed=0, options={"bpw": 3.0})
    done, info = False, {}
    while not done:
        _, _, done, _, info = env.step(np.array([0.5], dtype=np.float32))
    choice = info["choice"]
    reward_cost = sum(measured.losses["kl"][i, choice[u]] for u, members in enumerate(env.problem.units) for i in members)
    assert info["loss"] == pytest.approx(reward_cost)
    with pytest.raises(BitallocError, match="other layers, options, bits or tie groups"):
        BitAllocEnv(features, reward_tables=[dataclasses.replace(measured, bits=measured.bits + 8)])
    with pytest.raises(BitallocError, match="other layers, options, bits or tie groups"):
        BitAllocEnv(features, reward_tables=[dataclasses.replace(measured, tie_group=np.arange(measured.num_layers))])
    with pytest.raises(BitallocError, match="mix features tables"):
        BitAllocEnv([features, measured])


def test_features_only_policy_trains_applies_to_features_tables_only(features, tmp_path: Path) -> None:
    measured = measured_twin(features)
    config = TrainConfig(timesteps=200, seed=1, checkpoint_every=100, learning_starts=50, batch_size=32, net_arch=(16, 16),
                         constraints=Constraints(loss=CHEAP_LOSS))
    path = train([features], tmp_path / "run", config, progress=False, reward_tables=[measured], reward_loss="kl")
    card = read_card(path)
    assert card.features_only and card.observation_version == FEATURES_OBSERVATION_VERSION
    bitmap = apply_policy(load_policy(path), features, 3.0, Constraints(loss=CHEAP_LOSS))
    assert bitmap.predicted_bpw <= 3.0
    with pytest.raises(BitallocError, match="needs a features table"):
        apply_policy(load_policy(path), measured, 3.0)


def test_cli_features_then_solve_with_a_features_only_policy(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> None:
    common = ["--corpus", str(text_file), "--no-progress"]
    code, stdout, _ = run(capsys, "features", "--model", str(tiny_model_dir), "--samples", "2", "--seqlen", "32", "--options", *OPTIONS,
                          *common)
    assert code == 0 and Path(stdout.strip().splitlines()[-1]).is_file()
    code, _, err = run(capsys, "train", "--features-only", "--models", str(tiny_model_dir), "--loss", "nope", "--samples", "4", "--seqlen", "32",
                       "--out", str(tmp_path / "r"), *common)
    assert_one_line_error(code, err, "--loss 'nope' is not in a profile made for --models")
    out = tmp_path / "run"
    profile = ["--samples", "4", "--seqlen", "32"]
    code, _, err = run(capsys, "train", "--features-only", "--models", str(tiny_model_dir), "--timesteps", "120", "--checkpoint-every", "100",
                       "--out", str(out), *profile, *common)
    assert code == 0, err
    assert read_card(out / "policy.zip").features_only
    profiles = set((isolated_cache / "profiles").glob("*.npz"))
    code, _, err = run(capsys, "solve", "--policy", str(out / "policy.zip"), "--model", str(tiny_model_dir), "--bpw", "3",
                       "--out", str(tmp_path / "b.json"), *profile, *common)
    assert code == 0, err
    assert BitMap.load(tmp_path / "b.json").predicted_bpw <= 3
    assert set((isolated_cache / "profiles").glob("*.npz")) == profiles  # solving read the features table, profiled nothing
    code, stdout, err = run(capsys, "run", "--policy", str(out / "policy.zip"), "--model", str(tiny_model_dir), "--bpw", "3", "--tokens", "128",
                            *profile, *common)
    assert code == 0, err
    stages = next(line for line in stdout.splitlines() if line.startswith("stages: "))
    assert "[1/4] features pass" in stdout and "features " in stages and "profile " not in stages and "kl " not in stages
    assert set((isolated_cache / "profiles").glob("*.npz")) == profiles
    code, _, err = run(capsys, "run", "--policy", str(out / "policy.zip"), "--model", str(tiny_model_dir), "--bpw", "3", "--kl-seqlen", "16",
                       "--ray", *profile, *common)
    assert_one_line_error(code, err, "is a features-only policy: it reads the features pass alone (no profile, no KL), so --ray, --kl-seqlen")


def test_features_pass_with_a_fisher_input_prices_every_twin(loaded, corpus, features) -> None:
    from allocator.table.losses import FISHER_TWIN

    with_fisher = features_table(loaded, corpus, parse_options(OPTIONS), samples=2, seqlen=32, cache=False, progress=False,
                                 fisher_windows=2, fisher_seqlen=16)
    fisher = with_fisher.losses[FISHER_TWIN]
    assert fisher.shape == features.losses[CHEAP_LOSS].shape and np.isfinite(fisher).all() and (fisher >= 0).all()
    two, four = with_fisher.option_index("gptq-w2g16"), with_fisher.option_index("gptq-w4g16")
    assert (fisher[:, four] <= fisher[:, two]).all() and (fisher[:, two] > 0).any()
    assert with_fisher.metadata[FEATURES_PASS_KEY]["fisher"]["windows"] == 2
    assert np.array_equal(with_fisher.features, features.features)  # the input adds a loss, never changes a feature
    assert with_fisher.key.code_version != features.key.code_version  # a cache of its own
    with pytest.raises(BitallocError, match="Fisher input"):
        features_table(loaded, corpus, parse_options(OPTIONS), samples=2, seqlen=32, cache=False, progress=False, fisher_windows=3)


def test_loss_model_fitted_on_a_features_table_with_fisher_prices_it(loaded, corpus) -> None:
    from policies.loss_model import LEARNED_LOSS, fit_loss_model, with_learned_loss

    table = features_table(loaded, corpus, parse_options(OPTIONS), samples=2, seqlen=32, cache=False, progress=False,
                           fisher_windows=2, fisher_seqlen=16)
    model = fit_loss_model([(measured_twin(table), table)], use_fisher=True, anchor="gptq-w2g16")
    priced = with_learned_loss(table, model)
    assert priced.default_loss == LEARNED_LOSS and np.isfinite(priced.losses[LEARNED_LOSS]).all()
    bitmap = solve(priced, Budget.bpw(2.5), Constraints(loss=LEARNED_LOSS))
    assert bitmap.total_bits <= Budget.bpw(2.5).max_bits(priced.total_numel)


def test_cli_solve_with_a_loss_model_runs_only_the_features_pass(loaded, corpus, tiny_model_dir, text_file, tmp_path, isolated_cache,
                                                                  capsys) -> None:
    from policies.loss_model import fit_loss_model

    common = ["--corpus", str(text_file), "--no-progress"]
    code, stdout, err = run(capsys, "features", "--model", str(tiny_model_dir), "--fisher-windows", "2", "--fisher-seqlen", "16",
                            "--samples", "2", "--seqlen", "32", "--options", *OPTIONS, *common)
    assert code == 0, err
    table = SensitivityTable.load(stdout.strip().splitlines()[-1])
    assert "fisher_twin" in table.losses
    model = fit_loss_model([(measured_twin(table), table)], anchor="gptq-w2g16").save(tmp_path / "loss.json")
    code, _, err = run(capsys, "solve", "--loss-model", str(model), "--model", str(tiny_model_dir), "--bpw", "3",
                       "--out", str(tmp_path / "b.json"), *common)
    assert code == 0, err
    bitmap = BitMap.load(tmp_path / "b.json")
    assert bitmap.predicted_bpw <= 3 and bitmap.loss_name == "learned_kl"
    assert not list((isolated_cache / "profiles").glob("*.npz"))  # priced from the features pass alone
    code, _, err = run(capsys, "solve", "--loss-model", str(model), "--loss", "kl", "--model", str(tiny_model_dir), "--bpw", "3", *common)
    assert_one_line_error(code, err, "--loss-model sets the loss")
    code, _, err = run(capsys, "solve", "--loss-model", "no-such-model", "--model", str(tiny_model_dir), "--bpw", "3", *common)
    assert_one_line_error(code, err, "no loss model at 'no-such-model'")
    code, _, err = run(capsys, "features", "--model", str(tiny_model_dir), "--fisher-windows", "9", "--samples", "2", "--seqlen", "32", *common)
    assert_one_line_error(code, err, "--fisher-windows takes 0 to --samples")


def test_cli_run_with_a_loss_model_runs_the_features_pass_instead_of_profile_and_kl(tiny_model_dir, text_file, tmp_path, isolated_cache,
                                                                                     capsys) -> None:
    from policies.loss_model import fit_loss_model

    common, calibration = ["--corpus", str(text_file), "--no-progress"], ["--samples", "2", "--seqlen", "32"]
    code, stdout, err = run(capsys, "features", "--model", str(tiny_model_dir), "--fisher-windows", "2", "--fisher-seqlen", "16",
                            *calibration, "--options", *OPTIONS, *common)
    assert code == 0, err
    table = SensitivityTable.load(stdout.strip().splitlines()[-1])
    model = fit_loss_model([(measured_twin(table), table)], anchor="gptq-w2g16").save(tmp_path / "loss.json")
    out = tmp_path / "job"
    code, stdout, err = run(capsys, "run", "--loss-model", str(model), "--model", str(tiny_model_dir), "--bpw", "3", "--tokens", "128",
                            *calibration, "--out", str(out), *common)
    assert code == 0, err
    assert "Fisher input on 2 x 16" in stdout and "minimizing learned_kl" in stdout
    stages = next(line for line in stdout.splitlines() if line.startswith("stages: "))
    assert "features " in stages and "profile " not in stages and "kl " not in stages
    bitmap = BitMap.load(out / "bitmap.json")
    assert bitmap.loss_name == "learned_kl" and bitmap.predicted_bpw <= 3
    assert {e.option for e in bitmap.modules.values()} <= set(table.labels)  # the loss model's own options
    assert not list((isolated_cache / "profiles").glob("*.npz"))  # no profile, no KL
    for flags, message in ((["--kl-anchors", "gptq-w2g16"], "it takes no --kl-anchors"), (["--options", "gptq3"], "it takes no --options"),
                           (["--samples", "1"], "--samples and --seqlen must be at least that")):
        code, _, err = run(capsys, "run", "--loss-model", str(model), "--model", str(tiny_model_dir), "--bpw", "3", *flags, *common)
        assert_one_line_error(code, err, message)
    code, _, err = run(capsys, "run", "--loss-model", "no-such-model", "--model", str(tiny_model_dir), "--bpw", "3", *common)
    assert_one_line_error(code, err, "no loss model at 'no-such-model'")


def test_features_pass_without_activation_statistics_reads_weights_and_the_fisher_pass_alone(loaded, corpus, monkeypatch) -> None:
    from allocator.measure.features import ACTIVATION_FEATURES
    from allocator.table.losses import FISHER_TWIN, WEIGHT_ERR
    from policies.loss_model import INPUT_SETS, LEARNED_LOSS, fit_loss_model, with_learned_loss

    settings = {"samples": 2, "seqlen": 32, "cache": False, "progress": False, "fisher_windows": 2, "fisher_seqlen": 16}
    full = features_table(loaded, corpus, parse_options(OPTIONS), **settings)

    def no_forward(*_args, **_kwargs):
        raise AssertionError("the calibration forward ran")

    monkeypatch.setattr(features_pass, "_measure_layers", no_forward)
    lean = features_table(loaded, corpus, parse_options(OPTIONS), activation_statistics=False, **settings)
    measured = [j for j, name in enumerate(lean.feature_names) if name not in ACTIVATION_FEATURES]
    assert len(measured) == len(lean.feature_names) - len(ACTIVATION_FEATURES)
    assert np.isnan(np.delete(lean.features, measured, axis=1)).all()  # the activation features are not made up
    assert np.array_equal(lean.features[:, measured], full.features[:, measured])  # the weight and structure ones are the same
    assert np.array_equal(lean.bits, full.bits) and CHEAP_LOSS not in lean.losses
    assert np.allclose(lean.losses[WEIGHT_ERR], full.losses[WEIGHT_ERR]) and np.allclose(lean.losses[FISHER_TWIN], full.losses[FISHER_TWIN])
    assert lean.metadata[FEATURES_PASS_KEY]["activation_statistics"] is False and lean.key.code_version != full.key.code_version
    shape, weight_err = lean.losses[SHAPE_LOSS], lean.losses[WEIGHT_ERR]
    assert np.allclose(shape / shape[:, :1], weight_err / weight_err[:, :1])  # the default loss's shape from the weight error
    # a loss model reading structure and the Fisher input prices both tables alike; one reading activations refuses the lean one
    structural = fit_loss_model([(measured_twin(full), full)], anchor="gptq-w2g16", input_sets={"kind + depth": INPUT_SETS["kind + depth"]})
    assert not structural.needs_activation_statistics
    assert np.allclose(with_learned_loss(lean, structural).losses[LEARNED_LOSS], with_learned_loss(full, structural).losses[LEARNED_LOSS])
    every = fit_loss_model([(measured_twin(full), full)], anchor="gptq-w2g16", input_sets={"every feature": None})
    assert every.needs_activation_statistics
    with pytest.raises(BitallocError, match="lacks 'act_log_rms', which this loss model reads"):
        with_learned_loss(lean, every)
    with pytest.raises(BitallocError, match="made without activation statistics"):  # nor does a policy observe it
        BitAllocEnv(lean, constraints=Constraints(loss=WEIGHT_ERR))
    with pytest.raises(BitallocError, match="the twins of billm-.* need the input Hessian"):
        features_table(loaded, corpus, parse_options(["billm"]), activation_statistics=False, **settings)


def test_cli_run_with_a_structural_loss_model_skips_the_calibration_forward(tiny_model_dir, text_file, tmp_path, isolated_cache,
                                                                          capsys) -> None:
    from policies.loss_model import INPUT_SETS, fit_loss_model

    common, calibration = ["--corpus", str(text_file), "--no-progress"], ["--samples", "2", "--seqlen", "32"]
    fisher = ["--fisher-windows", "2", "--fisher-seqlen", "16"]
    code, stdout, err = run(capsys, "features", "--model", str(tiny_model_dir), *fisher, *calibration, "--options", *OPTIONS, *common)
    assert code == 0, err
    table = SensitivityTable.load(stdout.strip().splitlines()[-1])
    model = fit_loss_model([(measured_twin(table), table)], anchor="gptq-w2g16",
                           input_sets={"kind + depth": INPUT_SETS["kind + depth"]}).save(tmp_path / "loss.json")
    code, stdout, err = run(capsys, "run", "--loss-model", str(model), "--model", str(tiny_model_dir), "--bpw", "3", "--tokens", "128",
                            *calibration, *common)
    assert code == 0, err
    assert "features pass (weights and the Fisher input on 2 x 16 calibration tokens)" in stdout
    lean = [SensitivityTable.load(p) for p in (isolated_cache / "features").glob("*.npz")]  # inside the cache, not beside the model
    assert sorted(t.metadata[FEATURES_PASS_KEY]["activation_statistics"] for t in lean) == [False, True]
    code, stdout, err = run(capsys, "features", "--model", str(tiny_model_dir), "--no-activation-statistics", *fisher, *calibration,
                            "--options", *OPTIONS, *common)
    assert code == 0, err
    assert "without activation statistics, Fisher on 2 x 16 tokens" in stdout
    code, _, err = run(capsys, "features", "--model", str(tiny_model_dir), "--no-activation-statistics", "--options", "billm", *common)
    assert_one_line_error(code, err, "--no-activation-statistics: the twins of billm")
