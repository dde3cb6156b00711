"""Sensitivity table, solvers and bit map on small synthetic tables (fast: no model is loaded).

Bounds asserted for the heuristic solvers (greedy, convex, baq): feasible, and
``loss <= OPT + max_u (max_o loss[u, o] - min_o loss[u, o])`` where u runs over the units
(tie groups or layers) and o over their allowed options: at most one unit's whole loss range above
the optimum. For greedy and convex this is the classic bound of rounding the LP-relaxation optimum
(one fractional unit); for BAQ it is checked empirically. The exact solvers (ilp, ilp-cvxpy, dp)
must equal the brute-force optimum.
"""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from allocator.errors import BitallocError
from allocator.gguf.constants import GGML_TYPES
from allocator.gguf.ggml_types import ggml_type
from allocator.gguf.tensor_overrides import llama_cpp_args, llama_cpp_tensor_types
from allocator.model.arch import gguf_tensor_name, tie_groups
from allocator.runtime.gptqmodel import gptqmodel_dynamic
from allocator.solvers import SOLVERS, Budget, Constraints, build_problem, solve
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import NOT_APPLICABLE, Option, SensitivityTable, TableKey

EXACT = ("ilp", "ilp-cvxpy", "dp")
HEURISTIC = ("greedy", "convex", "baq")
SMALL_OPTIONS = [
    Option("billm", {"quantizer": "billm"}),
    Option("gptq-w2g64", {"quantizer": "gptq", "bits": 2, "group_size": 64}),
    Option("gptq-w3g64", {"quantizer": "gptq", "bits": 3, "group_size": 64}),
    Option("gptq-w4g64", {"quantizer": "gptq", "bits": 4, "group_size": 64}),
]


def small_table(seed: int, missing: float = 0.15) -> SensitivityTable:
    """6 layers (q, k, v, o, gate, up of one block: ties q/k/v and gate/up) x 4 options."""
    return SensitivityTable.synthetic(6, options=SMALL_OPTIONS, seed=seed, hidden=64, missing=missing, noise=0.5)


def brute_force(table: SensitivityTable, budget: Budget, constraints: Constraints) -> float:
    """Least loss over every per-layer assignment that fits and respects ties and availability."""
    loss = table.loss(constraints.loss)
    ok = table.available(constraints.loss)
    bpw = table.bits / table.numel[:, None]
    if constraints.min_bpw is not None:
        ok &= bpw >= constraints.min_bpw
    if constraints.max_bpw is not None:
        ok &= bpw <= constraints.max_bpw
    limit = budget.max_bits(table.total_numel)
    combos = np.array(list(itertools.product(range(table.num_options), repeat=table.num_layers)))
    layers = np.arange(table.num_layers)
    valid = ok[layers, combos].all(axis=1) & (table.bits[layers, combos].sum(axis=1) <= limit)
    if constraints.tie:
        for group in np.unique(table.tie_group):
            members = np.flatnonzero(table.tie_group == group)
            valid &= (combos[:, members] == combos[:, members[:1]]).all(axis=1)
    assert valid.any()
    return float(np.where(valid, np.nan_to_num(loss[layers, combos], nan=np.inf).sum(axis=1), np.inf).min())


def cases():
    for seed in range(4):
        for tie in (True, False):
            for bpw in (2.0, 2.7, 3.4):
                yield seed, tie, bpw


def check_feasible(table: SensitivityTable, bitmap: BitMap, budget: Budget, constraints: Constraints) -> np.ndarray:
    """Assert the bit map fits the budget, honors ties/availability, and return per-layer option indices."""
    choice = np.array([table.option_index(bitmap.modules[name].option) for name in table.names])
    layers = np.arange(table.num_layers)
    assert table.available(constraints.loss)[layers, choice].all()
    assert bitmap.total_bits == int(table.bits[layers, choice].sum())
    assert bitmap.total_bits <= budget.max_bits(table.total_numel)
    assert bitmap.total_bytes == -(-bitmap.total_bits // 8)
    assert bitmap.predicted_bpw == pytest.approx(bitmap.total_bits / table.total_numel)
    assert bitmap.predicted_loss == pytest.approx(float(table.loss(constraints.loss)[layers, choice].sum()))
    if constraints.tie:
        for group in np.unique(table.tie_group):
            assert len(set(choice[table.tie_group == group])) == 1
    return choice


@pytest.mark.parametrize("solver", EXACT)
def test_exact_solvers_equal_brute_force(solver):
    for seed, tie, bpw in cases():
        table, budget, constraints = small_table(seed), Budget.bpw(bpw), Constraints(tie=tie)
        optimum = brute_force(table, budget, constraints)
        bitmap = solve(table, budget, constraints, solver=solver)
        check_feasible(table, bitmap, budget, constraints)
        assert bitmap.predicted_loss == pytest.approx(optimum, rel=1e-9), (seed, tie, bpw)


@pytest.mark.parametrize("solver", HEURISTIC)
def test_heuristic_solvers_feasible_and_within_one_unit_range(solver):
    for seed, tie, bpw in cases():
        table, budget, constraints = small_table(seed), Budget.bpw(bpw), Constraints(tie=tie)
        optimum = brute_force(table, budget, constraints)
        problem = build_problem(table, budget, constraints)
        costs = np.where(problem.allowed, problem.cost, np.nan)
        one_unit = float(np.nanmax(np.nanmax(costs, axis=1) - np.nanmin(costs, axis=1)))
        bitmap = solve(table, budget, constraints, solver=solver)
        check_feasible(table, bitmap, budget, constraints)
        assert optimum - 1e-12 <= bitmap.predicted_loss <= optimum + one_unit, (seed, tie, bpw)
        if solver == "convex":
            assert bitmap.solver.info["lp_bound"] <= optimum * (1 + 1e-9)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_budget_ties_and_limits_hold_on_a_larger_table(solver):
    table = SensitivityTable.synthetic(21, seed=3, missing=0.1, loss_names=("hessian_err", "kl"))
    constraints = Constraints(loss="kl", min_bpw={r".*down_proj": 2.0}, max_bpw=5.0)
    for bpw in (2.2, 3.1):
        budget = Budget.bpw(bpw)
        bitmap = solve(table, budget, constraints, solver=solver)
        choice = check_feasible(table, bitmap, budget, constraints)
        chosen_bpw = table.bpw[np.arange(table.num_layers), choice]
        assert (chosen_bpw <= 5.0).all()
        assert all(chosen_bpw[i] >= 2.0 for i, n in enumerate(table.names) if n.endswith("down_proj"))
        assert bitmap.loss_name == "kl"
        reference = solve(table, budget, constraints, solver="ilp")
        assert reference.predicted_loss <= bitmap.predicted_loss * (1 + 1e-9)


def unit_brute_force(problem) -> float:
    """Least cost over every unit choice that fits (units are already tie groups)."""
    combos = np.array(list(itertools.product(range(problem.weight.shape[1]), repeat=problem.num_units)))
    units = np.arange(problem.num_units)
    valid = problem.allowed[units, combos].all(axis=1) & (problem.weight[units, combos].sum(axis=1) <= problem.budget_bits)
    return float(np.where(valid, np.where(problem.allowed, problem.cost, 0.0)[units, combos].sum(axis=1), np.inf).min())


@pytest.mark.parametrize("reduce", [True, False])
def test_ilp_with_repeated_layer_shapes_is_optimal(reduce):
    # Two blocks with ties: 8 units in 4 classes of equal stored bits, the case the class-count
    # formulation (integer counts, continuous x) exists for.
    from allocator.solvers.ilp import unit_classes

    for seed in range(3):
        table = SensitivityTable.synthetic(14, options=SMALL_OPTIONS, seed=seed, hidden=64, noise=0.5)
        for bpw in (2.0, 2.6, 3.3):
            problem = build_problem(table, Budget.bpw(bpw))
            assert len(np.unique(unit_classes(problem))) < problem.num_units
            bitmap = solve(table, Budget.bpw(bpw), solver="ilp", reduce=reduce)
            assert bitmap.predicted_loss == pytest.approx(unit_brute_force(problem), rel=1e-9), (seed, bpw)
            assert bitmap.solver.info["optimal"] is True


def test_ilp_agrees_with_the_per_unit_binary_model():
    # ilp-cvxpy writes one binary per (unit, option) without classes or fixing: an independent model
    table = SensitivityTable.synthetic(70, seed=7, noise=0.3)
    for bpw in (1.6, 2.4, 3.2, 4.0):
        fast = solve(table, Budget.bpw(bpw), solver="ilp")
        plain = solve(table, Budget.bpw(bpw), solver="ilp-cvxpy")
        assert fast.predicted_loss == pytest.approx(plain.predicted_loss, rel=1e-7), bpw


def test_ilp_time_limit_returns_the_incumbent():
    table = SensitivityTable.synthetic(200, seed=1, noise=0.3)
    bitmap = solve(table, Budget.bpw(2.5), solver="ilp", time_limit=1e-4)
    check_feasible(table, bitmap, Budget.bpw(2.5), Constraints())  # no error: at worst the incumbent
    info = bitmap.solver.info
    assert "time limit" in info["status"].lower() and info["optimal"] is False
    assert bitmap.predicted_loss >= solve(table, Budget.bpw(2.5), solver="ilp").predicted_loss * (1 - 1e-9)


def test_assign_class_is_the_least_cost_assignment():
    from allocator.solvers.ilp import assign_class

    rng = np.random.default_rng(0)
    for _ in range(20):
        cost = rng.random((5, 3))
        keep = rng.random((5, 3)) < 0.8
        keep[np.arange(5), rng.integers(0, 3, 5)] = True
        target = rng.choice([c for c in itertools.product(range(3), repeat=5) if keep[np.arange(5), list(c)].all()])
        counts = np.bincount(target, minlength=3)
        best = min(
            cost[np.arange(5), list(c)].sum()
            for c in itertools.product(range(3), repeat=5)
            if keep[np.arange(5), list(c)].all() and (np.bincount(c, minlength=3) == counts).all()
        )
        choice = assign_class(cost, keep, counts)
        assert (np.bincount(choice, minlength=3) == counts).all() and keep[np.arange(5), choice].all()
        assert cost[np.arange(5), choice].sum() == pytest.approx(best)


def test_exchange_keeps_the_budget_and_never_worsens():
    from allocator.solvers.repair import exchange, repair

    for seed in range(4):
        table = SensitivityTable.synthetic(35, seed=seed, noise=0.5)
        problem = build_problem(table, Budget.bpw(2.7))
        start = repair(problem, problem.lightest())
        better = exchange(problem, start)
        assert problem.total_bits(better) <= problem.budget_bits
        assert problem.allowed[np.arange(problem.num_units), better].all()
        assert problem.total_cost(better) <= problem.total_cost(start)


def test_solver_record():
    table = small_table(0)
    bitmap = solve(table, Budget.bpw(2.5), solver="dp", max_states=1000)
    record = bitmap.solver
    assert record.name == "dp" and record.settings["max_states"] == 1000
    assert record.settings["constraints"]["tie"] is True
    assert record.seconds > 0 and "step_bits" in record.info
    assert bitmap.budget["kind"] == "bpw" and bitmap.budget["bits"] == Budget.bpw(2.5).max_bits(table.total_numel)
    assert bitmap.table_key == table.key.digest()


def test_dp_with_a_coarse_step_stays_feasible():
    table = SensitivityTable.synthetic(28, seed=5)
    budget = Budget.bpw(2.6)
    bitmap = solve(table, budget, solver="dp", max_states=50)
    assert bitmap.solver.info["exact"] is False
    check_feasible(table, bitmap, budget, Constraints())


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_byte_budget(solver):
    table = small_table(1)
    n_bytes = int(2.6 * table.total_numel / 8)
    bitmap = solve(table, Budget.bytes(n_bytes), solver=solver)
    assert bitmap.total_bytes <= n_bytes
    assert bitmap.budget == {"kind": "bytes", "value": n_bytes, "bits": 8 * n_bytes}
    # the same size stated as the whole model with other tensors beside the table
    whole = solve(table, Budget.bytes(n_bytes + 1000, other_bytes=1000), solver=solver)
    assert whole.options() == bitmap.options()
    optimum = brute_force(table, Budget.bytes(n_bytes), Constraints())
    if solver == "ilp":
        assert bitmap.predicted_loss == pytest.approx(optimum, rel=1e-9)


def test_bpw_budget_is_exact_decimal():
    assert Budget.bpw(2.5).max_bits(1000) == 2500
    assert Budget.bpw(0.1).max_bits(30) == 3  # 0.1 * 30 is 3.0000000000000004 in floats; floor is still 3
    assert Budget.bpw(0.7).max_bits(10) == 7  # 0.7 * 10 is 7.000000000000001; floor must not drop to 6


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_infeasible_budget_names_the_feasible_range(solver):
    table = small_table(0)
    problem = build_problem(table, Budget.bpw(100.0))
    low, high = problem.min_bits / table.total_numel, problem.max_bits / table.total_numel
    with pytest.raises(BitallocError, match=r"feasible range is ([\d.]+) to ([\d.]+) bpw") as error:
        solve(table, Budget.bpw(low - 0.05), solver=solver)
    shown = re.search(r"range is ([\d.]+) to ([\d.]+) bpw", str(error.value))
    assert float(shown.group(1)) == pytest.approx(low, abs=1e-4) and float(shown.group(2)) == pytest.approx(high, abs=1e-4)
    assert "\n" not in str(error.value)


def test_user_errors():
    table = small_table(0)
    with pytest.raises(BitallocError, match="unknown solver"):
        solve(table, Budget.bpw(3), solver="simplex")
    with pytest.raises(BitallocError, match="no setting"):
        solve(table, Budget.bpw(3), solver="greedy", max_states=3)
    with pytest.raises(BitallocError, match="no loss 'kl'"):
        solve(table, Budget.bpw(3), Constraints(loss="kl"))
    with pytest.raises(BitallocError, match="matches no layer"):
        solve(table, Budget.bpw(3), Constraints(min_bpw={"lm_head": 4.0}))
    with pytest.raises(BitallocError, match="no option is allowed"):
        solve(table, Budget.bpw(3), Constraints(min_bpw=9.0))
    with pytest.raises(BitallocError, match="budget must be"):
        Budget.bpw(0)


# -- sensitivity table ------------------------------------------------------------------------


def test_tie_groups_from_names():
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
    ]
    assert tie_groups(names).tolist() == [0, 0, 0, 1, 2, 2, 3, 4, 4]


def test_table_round_trip(tmp_path):
    table = SensitivityTable.synthetic(14, seed=2, missing=0.2, loss_names=("hessian_err", "kl"))
    table.bits[3, 0] = NOT_APPLICABLE
    table.key = TableKey(model="smollm2-135m", corpus="enwiki", samples=64, seqlen=512)
    path = table.save(tmp_path / "tables" / "t.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["t.npz"]  # no temp files left
    loaded = SensitivityTable.load(path)
    assert loaded.names == table.names and loaded.labels == table.labels
    assert [o.settings for o in loaded.options] == [o.settings for o in table.options]
    assert loaded.key == table.key and loaded.key.digest() == table.key.digest()
    assert loaded.metadata == table.metadata and loaded.feature_schema == "synthetic-v1"
    np.testing.assert_array_equal(loaded.bits, table.bits)
    np.testing.assert_array_equal(loaded.numel, table.numel)
    np.testing.assert_array_equal(loaded.tie_group, table.tie_group)
    np.testing.assert_array_equal(loaded.features, table.features)
    for name in table.loss_names:
        np.testing.assert_array_equal(loaded.losses[name], table.losses[name])  # NaNs included
    assert not loaded.available()[3, 0]


def test_table_load_errors(tmp_path):
    with pytest.raises(BitallocError, match="no sensitivity table"):
        SensitivityTable.load(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(BitallocError, match="cannot read"):
        SensitivityTable.load(junk)
    table = small_table(0)
    with pytest.raises(BitallocError, match="shape"):
        SensitivityTable(table.names, table.numel, table.tie_group, table.options, table.bits[:, :2], table.losses, table.key)


# -- bit map ------------------------------------------------------------------------------------


def test_bitmap_round_trip(tmp_path):
    table = SensitivityTable.synthetic(14, seed=4)
    bitmap = solve(table, Budget.bpw(2.8))
    path = bitmap.save(tmp_path / "map.json")
    loaded = BitMap.load(path)
    assert loaded == bitmap
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["solver"]["name"] == "ilp"
    assert data["total_bytes"] == bitmap.total_bytes and data["predicted_bpw"] == pytest.approx(bitmap.predicted_bpw)
    entry = data["modules"]["model.layers.0.self_attn.q_proj"]
    assert set(entry) == {"option", "settings", "storage_bits", "numel"} and "quantizer" in entry["settings"]


def test_bitmap_validation(tmp_path):
    bitmap = solve(small_table(0), Budget.bpw(2.8))
    good = bitmap.to_json()
    bad_cases = {
        "schema": {**good, "schema_version": 99},
        "total_bits": {**good, "total_bits": good["total_bits"] + 8},
        "modules": {**good, "modules": {}},
        "storage_bits": {**good, "modules": {"m": {**next(iter(good["modules"].values())), "storage_bits": -1}}},
    }
    for what, data in bad_cases.items():
        path = tmp_path / f"{what}.json"
        path.write_text(json.dumps(data))
        with pytest.raises(BitallocError) as error:
            BitMap.load(path)
        assert "\n" not in str(error.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(BitallocError, match="cannot read bit map"):
        BitMap.load(tmp_path / "broken.json")
    with pytest.raises(BitallocError, match="no bit map"):
        BitMap.load(tmp_path / "missing.json")


def test_llama_cpp_tensor_types():
    options = [
        Option("billm", {"quantizer": "billm"}),
        Option("gptq-w3g128", {"quantizer": "gptq", "bits": 3, "group_size": 128}),
        Option("gptq-w4g128", {"quantizer": "gptq", "bits": 4, "group_size": 128}),
        Option("keep8", {"quantizer": "rtn", "bits": 8, "group_size": None, "symmetric": True}),
    ]
    table = SensitivityTable.synthetic(14, options=options, seed=0)
    bitmap = solve(table, Budget.bpw(3.6))
    lines = llama_cpp_tensor_types(bitmap)
    assert len(lines) == 14
    types = dict(line.split("=") for line in lines)
    expected = {"billm": "iq1_s", "gptq-w3g128": "q3_k", "gptq-w4g128": "q4_k", "keep8": "q8_0"}
    for name, entry in bitmap.modules.items():
        assert types[re.escape(gguf_tensor_name(name) + ".weight")] == expected[entry.option]
    # tied q/k/v get one type, and the patterns select exactly their tensor (blk.1 is not blk.10)
    assert types[r"blk\.0\.attn_q\.weight"] == types[r"blk\.0\.attn_k\.weight"] == types[r"blk\.0\.attn_v\.weight"]
    assert re.search(r"blk\.1\.attn_q\.weight", "blk.10.attn_q.weight") is None
    assert gguf_tensor_name("model.layers.12.mlp.down_proj") == "blk.12.ffn_down"
    assert gguf_tensor_name("model.layers.3.self_attn.o_proj") == "blk.3.attn_output"
    args = llama_cpp_args(bitmap)
    assert args[0] == "--tensor-type" and args[1] == lines[0] and len(args) == 28
    assert ggml_type({"quantizer": "gptq", "bits": 2}) == GGML_TYPES["2"] == "q2_k"
    with pytest.raises(BitallocError, match="no GGUF tensor name"):
        gguf_tensor_name("lm_head")


def test_gptqmodel_dynamic():
    options = [
        Option("gptq-w2g64", {"quantizer": "gptq", "bits": 2, "group_size": 64}),
        Option("gptq-w4g128", {"quantizer": "gptq", "bits": 4, "group_size": 128, "symmetric": True}),
        Option("fp16", {"quantizer": "none"}),
    ]
    table = SensitivityTable.synthetic(7, options=options, seed=1)
    bitmap = solve(table, Budget.bpw(3.5))
    dynamic = gptqmodel_dynamic(bitmap)
    assert len(dynamic) == 7
    for name, entry in bitmap.modules.items():
        matches = [(k, v) for k, v in dynamic.items() if re.match(k[2:], name)]
        assert len(matches) == 1
        key, value = matches[0]
        if entry.option == "fp16":
            assert key.startswith("-:") and value == {}
        else:
            assert key.startswith("+:") and value["bits"] == entry.settings["bits"]
            assert value["group_size"] == entry.settings["group_size"]
    binary = solve(small_table(0), Budget.bpw(1.7))
    with pytest.raises(BitallocError, match="GPTQModel cannot store"):
        gptqmodel_dynamic(binary)


def test_default_loss_prefers_a_complete_measured_kl():
    table = SensitivityTable.synthetic(14, seed=3, loss_names=("hessian_err", "weight_err"))
    assert table.default_loss == "hessian_err"  # no KL: the first loss
    herr = table.losses["hessian_err"]
    partial = herr * 0.01
    partial[:, 1:] = np.nan  # measured for one anchor option only
    table.losses["kl"] = partial
    assert table.default_loss == "hessian_err"  # an incomplete kl cannot price every option
    table.losses["kl_est"] = herr * 0.02
    assert table.default_loss == "kl_est"
    assert np.array_equal(table.loss(), table.losses["kl_est"])
    assert solve(table, Budget.bpw(3.0)).loss_name == "kl_est"
    table.losses["kl"] = herr[::-1].copy()
    assert table.default_loss == "kl" and solve(table, Budget.bpw(3.0)).loss_name == "kl"
    assert solve(table, Budget.bpw(3.0), Constraints(loss="hessian_err")).loss_name == "hessian_err"
