"""The allocation environment: API compliance, budgets, determinism, the reward and its LP bound,
and the measured-KL backend on the tiny model."""

from __future__ import annotations

import dataclasses
import math
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gymnasium_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from allocator.errors import BitallocError
from allocator.solvers import Budget, Constraints, build_problem, solve
from allocator.solvers.convex import relax
from allocator.table.sensitivity import SensitivityTable
from envs import ENV_ID, BitAllocEnv, FeatureNormalization, RewardConfig
from envs.bitalloc_env import ACTION_MAPPINGS, paced_price, pareto_options, price_choice
from envs.observation import BUDGET_FEATURES, observation_names
from envs.reward import LPRelaxation, budget_penalty


def synthetic(seed: int = 1, layers: int = 28, missing: float = 0.0) -> SensitivityTable:
    return SensitivityTable.synthetic(num_layers=layers, seed=seed, missing=missing)


def run_episode(env: BitAllocEnv, actions, seed: int | None = None, options: dict | None = None):
    """Play ``actions`` (a callable of the step index, or a sequence); returns observations, rewards, last info."""
    observation, info = env.reset(seed=seed, options=options)
    observations, rewards = [observation], []
    done, step = False, 0
    while not done:
        action = actions(step) if callable(actions) else actions[step]
        observation, reward, done, truncated, info = env.step(np.array([action], dtype=np.float32))
        assert not truncated
        observations.append(observation)
        rewards.append(reward)
        step += 1
    return observations, rewards, info


def action_for(env: BitAllocEnv, unit: int, option: int) -> float:
    """The action that picks ``option`` for ``unit`` (the middle of its share of [0, 1])."""
    choices = list(env.models[env._index].options[unit])
    return (choices.index(option) + 0.5) / len(choices)


def test_env_passes_gymnasium_and_sb3_checkers() -> None:
    env = BitAllocEnv([synthetic(1, missing=0.2), synthetic(2, layers=35)], render_mode="ansi")
    gymnasium_check_env(env, skip_render_check=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sb3_check_env(env, warn=True)
    # Box(0, 1) is asked for by design (an option index fraction); SB3 only recommends [-1, 1].
    assert all("symmetric and normalized Box action space" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert env.observation_space.shape == (len(env.observation_names),)
    assert env.render().startswith("synthetic-")


def test_registered_env_builds_through_gymnasium_make() -> None:
    env = gymnasium.make(ENV_ID, tables=[synthetic()], bpw_range=(2.0, 3.0))
    assert env.spec is not None and env.spec.id == ENV_ID
    observation, info = env.reset(seed=0)
    assert env.observation_space.contains(observation)
    assert 2.0 - 1e-6 <= info["target_bpw"] <= 3.0 + 1e-6


@pytest.mark.parametrize("tie", [True, False])
def test_budget_never_exceeded_after_projection(tie: bool) -> None:
    """Random episodes (actions biased to the heavy end so most overshoot) on tables with missing
    options: the projected allocation always fits, uses allowed options, and overshooting costs."""
    tables = [synthetic(seed, layers=21 + 7 * seed, missing=0.25) for seed in range(3)]
    env = BitAllocEnv(tables, bpw_range=(1.2, 5.0), constraints=Constraints(tie=tie))
    rng = np.random.default_rng(0)
    overshot = 0
    for episode in range(150):
        skew = rng.uniform(0.2, 3.0)
        _, rewards, info = run_episode(env, lambda _: rng.random() ** (1 / skew), seed=episode)
        problem = env.problem
        rows = np.arange(problem.num_units)
        assert info["bits"] <= info["budget_bits"] == problem.budget_bits
        assert problem.allowed[rows, info["choice"]].all()
        assert info["raw_bits"] == problem.total_bits(info["raw_choice"])
        assert info["bits"] == problem.total_bits(info["choice"])
        assert info["projected"] == (info["raw_bits"] > info["budget_bits"])
        model = env.models[info["table"]]
        assert model.low_bits <= info["budget_bits"] <= model.high_bits
        assert all(math.isfinite(r) for r in rewards) and rewards[:-1] == [0.0] * (len(rewards) - 1)
        if info["raw_bits"] > info["budget_bits"] * (1 + env.reward_config.tolerance):
            overshot += 1
            assert rewards[-1] <= -env.reward_config.cliff
    assert overshot > 10  # the loop did exercise the projection


def test_same_seed_same_episode_and_reset_options() -> None:
    tables = [synthetic(1), synthetic(2, layers=42, missing=0.1)]
    first, second = BitAllocEnv(tables), BitAllocEnv(tables)
    actions = np.random.default_rng(5).random(64)
    for seed in (0, 7):
        a = run_episode(first, actions, seed=seed)
        b = run_episode(second, actions, seed=seed)
        assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]
        assert np.array_equal(a[2]["choice"], b[2]["choice"]) and a[2]["budget_bits"] == b[2]["budget_bits"]
    # later resets without a seed follow the seeded generator, identically in both
    assert [first.reset()[1]["budget_bits"] for _ in range(3)] == [second.reset()[1]["budget_bits"] for _ in range(3)]
    budgets = {first.reset(seed=s)[1]["budget_bits"] for s in range(8)}
    assert len(budgets) > 4
    # a fixed budget and table
    _, info = first.reset(options={"bpw": 2.5, "table": 1})
    assert info["table"] == 1 and info["budget_bits"] == Budget.bpw(2.5).max_bits(tables[1].total_numel)
    with pytest.raises(BitallocError, match="infeasible"):
        first.reset(options={"bpw": 0.5})
    with pytest.raises(BitallocError, match="unknown reset option"):
        first.reset(options={"budget": 3})
    with pytest.raises(BitallocError, match="out of range"):
        first.reset(options={"table": 2})


def test_actions_map_to_non_dominated_options_lightest_first() -> None:
    table = synthetic(3, missing=0.3)
    env = BitAllocEnv(table)
    problem = env.models[0].problem
    options = pareto_options(problem)
    for unit, kept in enumerate(options):
        bits, cost = problem.weight[unit, kept], problem.cost[unit, kept]
        assert (np.diff(bits) > 0).all() and (np.diff(cost) < 0).all()
        for other in np.flatnonzero(problem.allowed[unit]):  # every dropped option is dominated by a kept one
            assert ((bits <= problem.weight[unit, other]) & (cost <= problem.cost[unit, other])).any()
    _, _, low = run_episode(env, lambda _: 0.0, options={"bpw": 4.0})
    _, _, high = run_episode(env, lambda _: 1.0, options={"bpw": 8.0})
    assert list(low["raw_choice"]) == [k[0] for k in options]
    assert list(high["raw_choice"]) == [k[-1] for k in options]
    assert low["raw_bits"] == env.models[0].min_bits and high["raw_bits"] == env.models[0].max_bits


def test_price_actions_pace_the_budget_by_the_relaxation_of_the_units_left() -> None:
    for seed in range(3):
        table = synthetic(seed, layers=21 + 7 * seed, missing=0.2)
        env = BitAllocEnv(table, action_mapping="price")
        model = env.models[0]
        relaxation = model.relaxation
        assert paced_price(relaxation, 0, model.min_bits - 1) == math.inf
        assert paced_price(relaxation, 0, model.max_bits) == 0.0
        prices = [paced_price(relaxation, 0, b) for b in np.linspace(model.min_bits, model.max_bits, 25)]
        assert all(a >= b for a, b in zip(prices, prices[1:])) and prices[0] > prices[-1]  # more bits, a lower price
        steps = np.diff(model.problem.weight, axis=1)
        largest_step = int(np.abs(steps[np.isfinite(steps)]).max())
        for bpw in (2.0, 2.5, 3.0, 3.5):
            _, _, info = run_episode(env, lambda _: 0.5, options={"bpw": bpw})
            # the price held at the relaxation's keeps the raw allocation within one option step of the budget
            assert abs(info["raw_bits"] - info["budget_bits"]) <= largest_step
            assert info["loss"] >= solve(table, Budget.bpw(bpw), env.constraints).predicted_loss * (1 - 1e-9)
    # a higher action is a lower price: never a lighter option
    rng = np.random.default_rng(0)
    for _ in range(200):
        bits = np.cumsum(rng.integers(1, 50, size=5)).astype(np.float64)
        costs = np.sort(rng.random(5))[::-1] * 10
        picks = [price_choice(costs, bits, 0.03, a) for a in np.linspace(0, 1, 11)]
        assert picks == sorted(picks)
    assert price_choice(np.array([3.0, 1.0]), np.array([1.0, 2.0]), math.inf, 1.0) == 0
    with pytest.raises(BitallocError, match="action mapping"):
        BitAllocEnv(synthetic(), action_mapping="bits")
    assert ACTION_MAPPINGS == ("index", "price")
    from allocator.cli import TRAIN_ACTION_MAPPINGS  # spelled out there to keep the CLI light

    assert set(TRAIN_ACTION_MAPPINGS) == set(ACTION_MAPPINGS)


def test_lp_relaxation_equals_the_highs_lp_and_bounds_the_optimum() -> None:
    table = synthetic(4, layers=35, missing=0.2)
    env = BitAllocEnv(table)
    low, high = env.models[0].min_bits / table.total_numel, env.models[0].max_bits / table.total_numel
    for bpw in np.linspace(low, high, 7)[1:-1].round(3):
        problem = build_problem(table, Budget.bpw(float(bpw)))
        relaxation = LPRelaxation(problem)
        _, lp_value = relax(problem)
        bound = relaxation.bound(problem.budget_bits)
        assert bound == pytest.approx(lp_value, rel=1e-6)
        assert relaxation.unit_costs(problem.budget_bits).sum() == pytest.approx(bound, rel=1e-9)
        assert bound <= solve(table, Budget.bpw(float(bpw))).predicted_loss * (1 + 1e-9)


def test_reward_is_quality_first_with_an_asymmetric_budget_penalty() -> None:
    table = synthetic(5, layers=35)
    env = BitAllocEnv(table)
    bpw = 2.6
    optimum = solve(table, Budget.bpw(bpw))
    env.reset(options={"bpw": bpw})
    unit_choice = [table.option_index(optimum.modules[table.names[m[0]]].option) for m in env.problem.units]
    _, rewards, info = run_episode(env, lambda u: action_for(env, u, unit_choice[u]), options={"bpw": bpw})
    # the ILP optimum is within a few percent of the LP bound: quality near 0, small undershoot only
    assert info["loss"] == pytest.approx(optimum.predicted_loss) and not info["projected"]
    eps = env.models[0].eps
    expected = -math.log((info["loss"] + eps) / (info["reference_loss"] + eps)) - budget_penalty(info["raw_bits"], info["budget_bits"], RewardConfig())
    assert rewards[-1] == pytest.approx(expected) and -0.1 < rewards[-1] <= 0.0
    # everything at its lightest option: fits, but the quality is far worse
    _, light, _ = run_episode(env, lambda _: 0.0, options={"bpw": bpw})
    assert light[-1] < rewards[-1] - 0.5
    # overshoot is penalized more than the same undershoot, and beyond the tolerance by the cliff
    config = RewardConfig()
    assert budget_penalty(105, 100, config) > budget_penalty(95, 100, config)
    assert budget_penalty(110, 100, config) - budget_penalty(104, 100, config) > config.cliff
    with pytest.raises(BitallocError, match="over_weight"):
        RewardConfig(over_weight=-1.0)


def test_dense_shaping_keeps_the_episode_return() -> None:
    tables = [synthetic(6, missing=0.1)]
    sparse, dense = BitAllocEnv(tables), BitAllocEnv(tables, reward=RewardConfig(dense=True))
    for seed in range(5):
        actions = np.random.default_rng(seed).random(64)
        _, r_sparse, _ = run_episode(sparse, actions, seed=seed)
        _, r_dense, _ = run_episode(dense, actions, seed=seed)
        assert sum(r_dense) == pytest.approx(sum(r_sparse), abs=1e-9)
        assert any(r != 0.0 for r in r_dense[:-1])


def test_observation_layout_and_normalization() -> None:
    tables = [synthetic(1), synthetic(2, layers=42)]
    env = BitAllocEnv(tables)
    assert env.observation_names == observation_names(tables[0].feature_names)
    observation, info = env.reset(options={"bpw": 3.0, "table": 0})
    state = dict(zip(BUDGET_FEATURES, observation[-len(BUDGET_FEATURES):]))
    assert state["budget_used"] == 0 and state["units_left"] == 1 and state["weights_left"] == 1 and state["previous_action"] == 0
    assert state["affordable_bpw"] == pytest.approx(state["target_bpw"]) == pytest.approx(info["target_bpw"] / 8, rel=1e-6)
    observation, *_ = env.step(np.array([0.75], dtype=np.float32))
    state = dict(zip(BUDGET_FEATURES, observation[-len(BUDGET_FEATURES):]))
    assert state["previous_action"] == 0.75 and 0 < state["budget_used"] < 1 and state["units_left"] < 1
    # the fitted normalization z-scores the training layers and survives its JSON form
    normalization = FeatureNormalization.fit(tables)
    stacked = normalization.apply(np.concatenate([t.features for t in tables]))
    assert np.allclose(stacked.mean(axis=0), 0, atol=1e-6) and np.allclose(stacked.std(axis=0), 1, atol=1e-6)
    assert FeatureNormalization.from_dict(normalization.as_dict()) == normalization
    # tables described by other features are refused, in one line
    other = dataclasses.replace(synthetic(3), feature_schema="bitalloc-features-v1")
    with pytest.raises(BitallocError, match="different features"):
        BitAllocEnv([tables[0], other])
    with pytest.raises(BitallocError, match="feature schema mismatch"):
        BitAllocEnv(other, normalization=normalization)


def test_kl_backend_measures_the_allocation_on_the_tiny_model(tiny_model_dir, text_file, isolated_cache) -> None:
    from allocator.measure.profile import profile_model
    from allocator.model.corpus import load_corpus
    from allocator.model.loading import load_model
    from allocator.table.options import parse_options
    from envs.quality import KLQuality, layer_labels

    loaded = load_model(str(tiny_model_dir))
    corpus = load_corpus(str(text_file))
    table = profile_model(loaded, corpus, parse_options(["xnor:group_size=128", "gptq"]), samples=4, seqlen=32, progress=False)
    quality = KLQuality.from_model(table, loaded, corpus, windows=2)
    env = BitAllocEnv(table, quality=[quality])
    _, rewards, heavy = run_episode(env, lambda _: 1.0, options={"bpw": 3.0})
    assert heavy["quality"] == "kl" and math.isfinite(rewards[-1])
    overlay = quality.weights.assemble(layer_labels(env.problem, heavy["choice"]))
    assert heavy["loss"] == pytest.approx(quality.probe.mean_kl(overlay))
    _, _, light = run_episode(env, lambda _: 0.0, options={"bpw": 3.0})
    assert light["loss"] > heavy["loss"] > 0  # 1-bit everywhere hurts more than the budget's best
    assert len(quality._reference) == 1  # the solver's reference KL is measured once per budget
    assert heavy["reference_loss"] == light["reference_loss"]
    with pytest.raises(BitallocError, match="profiled on"):
        KLQuality.from_model(dataclasses.replace(table, key=dataclasses.replace(table.key, model="other")), loaded, corpus)
