"""SAC training, the policy artifact and its checks, zero-shot application, and the CLI
(``bitalloc train`` / ``bitalloc solve --policy``), on small synthetic tables and the tiny model."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from allocator.errors import BitallocError
from allocator.solvers import Budget, Constraints, solve
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable
from policies.apply import NAME, apply_policy
from policies.artifact import load_policy, read_card, sidecar_path
from policies.sac import TrainConfig, train
from tests.cli_helpers import assert_one_line_error, run

SMALL = dict(learning_starts=100, batch_size=32, net_arch=(32, 32))


def synthetic(seed: int = 1, layers: int = 28, missing: float = 0.0) -> SensitivityTable:
    return SensitivityTable.synthetic(num_layers=layers, seed=seed, missing=missing)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A policy trained for 300 steps on one synthetic table (checkpoints every 150 steps)."""
    out = tmp_path_factory.mktemp("sac")
    return train([synthetic(1)], out, TrainConfig(timesteps=300, seed=3, checkpoint_every=150, **SMALL), progress=False)


def test_training_writes_the_artifact_checkpoints_and_logs(trained: Path) -> None:
    run_dir = trained.parent
    card = read_card(trained)
    assert card.timesteps == 300 and card.seed == 3 and card.bpw_range == (1.5, 4.0)
    assert card.feature_schema == "synthetic-v1" and card.models[0]["model"] == synthetic(1).key.model
    assert card.models[0]["option_labels"] == synthetic(1).labels
    assert card.policy_kwargs == {"net_arch": [32, 32]} and card.reward.dense
    sidecar = json.loads(sidecar_path(trained).read_text())
    assert sidecar["schema_version"] == 1 and len(sidecar["normalization"]["mean"]) == 11
    checkpoints = run_dir / "checkpoints"
    for steps in (150, 300):
        assert read_card(checkpoints / f"sac_{steps}_steps.zip").timesteps == steps
        assert (checkpoints / f"sac_replay_buffer_{steps}_steps.npz").is_file()
        assert not (checkpoints / f"sac_replay_buffer_{steps}_steps.pkl").exists()  # never a pickle
    header = (run_dir / "logs" / "progress.csv").read_text().splitlines()[0].split(",")
    assert "allocation/loss_ratio" in header and "train/actor_loss" in header


def test_training_keeps_the_best_checkpoint(trained: Path) -> None:
    """best_policy.zip is the checkpoint with the lowest deterministic score (as SB3's EvalCallback keeps a best model)."""
    from envs.bitalloc_env import BitAllocEnv
    from policies.artifact import load_checkpoint
    from policies.sac import EVAL_BPW, policy_score

    run_dir = trained.parent
    best = json.loads((run_dir / "best.json").read_text())
    assert read_card(run_dir / "best_policy.zip").timesteps == best["steps"] and best["budgets"] == list(EVAL_BPW)
    card = read_card(trained)
    env = BitAllocEnv([synthetic(1)], normalization=card.normalization, action_mapping=card.action_mapping)
    scores = {steps: policy_score(load_checkpoint(run_dir / "checkpoints" / f"sac_{steps}_steps.zip", env), env, EVAL_BPW)
              for steps in (150, 300)}
    assert scores[best["steps"]] == pytest.approx(best["score"]) and best["score"] == pytest.approx(min(scores.values()))
    assert all(np.isfinite(list(scores.values()))) and min(scores.values()) >= -1e-9  # the LP bound is a lower bound
    header = (run_dir / "logs" / "progress.csv").read_text().splitlines()[0].split(",")
    assert "eval/score" in header


def test_policy_score_skips_budgets_a_table_cannot_meet() -> None:
    from envs.bitalloc_env import BitAllocEnv
    from policies.sac import policy_score

    class Constant:
        def predict(self, observation, deterministic=True):
            return np.array([0.5], dtype=np.float32), None

    env = BitAllocEnv([synthetic(1)])
    lowest = env.models[0].min_bits / env.models[0].problem.total_numel
    feasible = policy_score(Constant(), env, [lowest + 0.5])
    assert policy_score(Constant(), env, [lowest / 2, lowest + 0.5]) == pytest.approx(feasible)  # the infeasible one is skipped
    assert np.isfinite(policy_score(Constant(), env, [lowest / 2]))  # none feasible: the table's mid-range budget


def test_selection_after_training_chooses_the_checkpoint_training_kept(trained: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without best_policy.zip (trained before it was kept) gets one after the fact: the
    lowest-scoring checkpoint as training scores them (the final policy standing for its step count),
    a byte copy of it, scored without unpickling; a run with one keeps it."""
    import pickle

    from envs.bitalloc_env import BitAllocEnv
    from policies.artifact import load_checkpoint
    from policies.best_checkpoint import BEST_FILE, BEST_RECORD, read_best
    from policies.sac import EVAL_BPW, policy_score
    from policies.selection import checkpoint_steps, checkpoint_zips, select_best

    run_dir = tmp_path / "run"
    shutil.copytree(trained.parent, run_dir)
    (run_dir / BEST_FILE).unlink()
    sidecar_path(run_dir / BEST_FILE).unlink()
    (run_dir / BEST_RECORD).unlink()
    assert [steps for steps, _ in checkpoint_zips(run_dir)] == [150, 300]
    assert checkpoint_zips(run_dir)[-1][1] == run_dir / "policy.zip"  # the final policy stands for its step count
    assert checkpoint_steps(Path("sac_150_steps.zip")) == 150 and checkpoint_steps(Path("sac_replay_buffer_150_steps.pkl")) is None
    with pytest.raises(BitallocError, match="trained on other tables"):
        select_best(run_dir, [synthetic(2)])
    card = read_card(trained)
    env = BitAllocEnv([synthetic(1)], normalization=card.normalization, action_mapping=card.action_mapping)
    scores = {steps: policy_score(load_checkpoint(path, env), env, EVAL_BPW) for steps, path in checkpoint_zips(run_dir)}
    monkeypatch.setattr(pickle, "load", lambda *_a, **_k: pytest.fail("unpickled a checkpoint to score it"))
    best = select_best(run_dir, [synthetic(1)])
    chosen = read_best(run_dir)
    assert best == run_dir / BEST_FILE and chosen["chosen_after_training"] is True and chosen["budgets"] == list(EVAL_BPW)
    assert chosen["steps"] == min(scores, key=scores.get) and chosen["score"] == pytest.approx(min(scores.values()), abs=1e-12)
    source = dict(checkpoint_zips(run_dir))[chosen["steps"]]
    assert best.read_bytes() == source.read_bytes() and sidecar_path(best).read_bytes() == sidecar_path(source).read_bytes()
    (run_dir / "policy.zip").unlink()  # nothing is scored again once the run has its best
    assert select_best(run_dir, [synthetic(2)]) == best and read_best(run_dir) == chosen


def test_a_best_checkpoint_is_replaced_only_by_a_lower_score(tmp_path: Path) -> None:
    from policies.best_checkpoint import BEST_FILE, keep_if_better, read_best

    written: list[int] = []

    def writer(steps: int):
        return lambda path: (path.write_text(str(steps)), written.append(steps))

    assert read_best(tmp_path) is None
    assert keep_if_better(tmp_path, 100, 0.5, [2.5], writer(100))
    assert not keep_if_better(tmp_path, 200, 0.5, [2.5], writer(200))  # a tie keeps the earlier one
    assert keep_if_better(tmp_path, 300, 0.25, [2.5], writer(300), note="x")
    assert read_best(tmp_path) == {"steps": 300, "score": 0.25, "budgets": [2.5], "note": "x"} and written == [100, 300]
    (tmp_path / BEST_FILE).unlink()  # a record without its zip is no best
    assert keep_if_better(tmp_path, 400, 0.75, [2.5], writer(400)) and (tmp_path / BEST_FILE).read_text() == "400"


def test_shipping_copies_the_artifact_unchanged(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import policies.pretrained as pretrained
    from policies.shipping import ship_policy

    target = ship_policy(trained, "tiny-sac", tmp_path / "given")
    assert target == tmp_path / "given" / "tiny-sac.zip"
    assert target.read_bytes() == trained.read_bytes() and sidecar_path(target).read_bytes() == sidecar_path(trained).read_bytes()
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path / "pretrained")  # the default, read at call time
    assert ship_policy(trained, "tiny-sac") == tmp_path / "pretrained" / "tiny-sac.zip" and pretrained.shipped() == ["tiny-sac"]
    assert pretrained.load("tiny-sac").card.zip_sha256 == read_card(trained).zip_sha256
    for name in ("", "..", "sub/tiny-sac", "tiny-sac.zip"):
        with pytest.raises(BitallocError, match="plain file name"):
            ship_policy(trained, name, tmp_path)


def test_applied_policy_meets_the_budget_on_other_tables(trained: Path) -> None:
    policy = load_policy(trained)
    for table, constraints in ((synthetic(2, layers=42, missing=0.2), Constraints()), (synthetic(7, layers=21), Constraints(tie=False))):
        for budget in (Budget.bpw(1.9), Budget.bpw(2.5), Budget.bpw(3.3), Budget.bytes(table.total_numel // 3)):
            bitmap = apply_policy(policy, table, budget, constraints)
            assert bitmap.total_bits <= budget.max_bits(table.total_numel)
            assert list(bitmap.modules) == table.names and bitmap.solver.name == NAME
            assert bitmap.solver.info["units"] == (table.num_layers if not constraints.tie else len(set(table.tie_group)))
            assert BitMap.from_json(bitmap.to_json()).options() == bitmap.options()
            # the ILP is optimal: a policy can at best match it
            assert bitmap.predicted_loss >= solve(table, budget, constraints).predicted_loss * (1 - 1e-9)
            assert apply_policy(policy, table, budget, constraints).options() == bitmap.options()  # deterministic


def test_applying_a_policy_never_unpickles(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    import cloudpickle
    from stable_baselines3 import SAC

    def refuse(*_args, **_kwargs):
        raise AssertionError("unpickling while applying a policy")

    for module, name in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(SAC, "load", refuse)
    bitmap = apply_policy(trained, synthetic(2), 2.5)
    assert bitmap.predicted_bpw <= 2.5


def test_the_sidecar_guards_the_zip(trained: Path, tmp_path: Path) -> None:
    def copy(name: str) -> Path:
        target = tmp_path / name / "policy.zip"
        target.parent.mkdir()
        shutil.copy(trained, target)
        shutil.copy(sidecar_path(trained), sidecar_path(target))
        return target

    def edit(path: Path, change) -> None:
        data = json.loads(sidecar_path(path).read_text())
        change(data)
        sidecar_path(path).write_text(json.dumps(data))

    def refused(path_or_table, message: str, table: SensitivityTable | None = None) -> None:
        with pytest.raises(BitallocError, match=message) as caught:
            apply_policy(path_or_table, table or synthetic(2), 2.5)
        assert "\n" not in str(caught.value)

    # a table profiled with another feature schema, or other features, is refused
    refused(trained, "feature schema mismatch", dataclasses.replace(synthetic(2), feature_schema="bitalloc-features-v1"))
    refused(trained, "has features", SensitivityTable.synthetic(num_layers=14, num_features=19))
    other_schema = copy("schema")
    edit(other_schema, lambda d: (d.update(feature_schema="other-v9"), d["normalization"].update(feature_schema="other-v9")))
    refused(other_schema, "schema mismatch")  # the hash still matches: the check is the schema's
    missing = copy("missing")
    sidecar_path(missing).unlink()
    refused(missing, "has no sidecar")
    tampered = copy("tampered")
    with zipfile.ZipFile(tampered, "a") as archive:
        archive.writestr("extra.txt", "changed")
    refused(tampered, "does not match its sidecar")
    for name, change, message in (
        ("version", lambda d: d.update(schema_version=99), "sidecar schema 99"),
        ("observation", lambda d: d.update(observation_version="bitalloc-obs-v0"), "train it again"),
        ("incomplete", lambda d: d.pop("normalization"), "incomplete policy sidecar"),
        ("mapping", lambda d: d.update(action_mapping="bits"), "action_mapping 'bits'"),
    ):
        path = copy(name)
        edit(path, change)
        refused(path, message)
    # the action mapping travels in the sidecar; one written before it existed used the index mapping
    assert read_card(trained).action_mapping == "price"
    older = copy("older")
    edit(older, lambda d: d.pop("action_mapping"))
    assert read_card(older).action_mapping == "index"
    refused(tmp_path / "nowhere.zip", "no policy at")


def test_resume_continues_from_the_latest_valid_checkpoint(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    table = synthetic(1)
    config = TrainConfig(timesteps=200, seed=0, checkpoint_every=100, **SMALL)
    train([table], tmp_path, config, progress=False)
    with pytest.raises(BitallocError, match="already holds a training run"):
        train([table], tmp_path, config, progress=False)
    with pytest.raises(BitallocError, match="other tables or settings"):
        train([synthetic(2)], tmp_path, config, resume=True, progress=False)
    with zipfile.ZipFile(tmp_path / "checkpoints" / "sac_200_steps.zip", "a") as archive:
        archive.writestr("extra.txt", "a checkpoint cut short")  # no longer matches its sidecar
    with caplog.at_level(logging.INFO, logger="policies.sac"):
        path = train([table], tmp_path, dataclasses.replace(config, timesteps=300), resume=True, progress=False)
    assert "resuming from sac_100_steps.zip (100 steps)" in caplog.text
    assert read_card(path).timesteps == 300
    assert read_card(tmp_path / "checkpoints" / "sac_300_steps.zip").timesteps == 300


def test_same_seed_same_policy(trained: Path, tmp_path: Path) -> None:
    again = train([synthetic(1)], tmp_path, TrainConfig(timesteps=300, seed=3, checkpoint_every=150, **SMALL), progress=False)
    first, second = load_policy(trained), load_policy(again)
    observations = np.random.default_rng(0).uniform(-2, 2, size=(16, len(first.card.observation_names))).astype(np.float32)
    assert all(np.array_equal(first.act(o), second.act(o)) for o in observations)
    assert first.card.normalization == second.card.normalization
    # byte-identical artifacts: zips without timestamps or wall-clock data (only the logs record times)
    files = sorted(p.relative_to(trained.parent) for p in trained.parent.rglob("*") if p.is_file() and "logs" not in p.parts)
    assert {"policy.zip", "policy.json", "best_policy.zip", "checkpoints/sac_150_steps.zip",
            "checkpoints/sac_replay_buffer_300_steps.npz"} <= {str(f) for f in files}
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file() and "logs" not in p.parts)
    for name in files:
        assert (trained.parent / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_cli_train_and_solve_with_a_policy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train_table, new_table = tmp_path / "a.npz", tmp_path / "b.npz"
    synthetic(1).save(train_table)
    synthetic(2, layers=35, missing=0.1).save(new_table)
    out = tmp_path / "run"
    common = ["--timesteps", "150", "--seed", "1", "--out", str(out), "--checkpoint-every", "100", "--no-progress"]
    code, stdout, _ = run(capsys, "train", "--profile", str(train_table), *common)
    assert code == 0 and stdout.strip().endswith(str(out / "policy.zip"))
    bitmap_path = tmp_path / "bitmap.json"
    code, stdout, _ = run(capsys, "solve", "--policy", str(out / "policy.zip"), "--profile", str(new_table), "--bpw", "2.75",
                          "--out", str(bitmap_path))
    assert code == 0 and stdout.startswith(f"{NAME}: ")
    bitmap = BitMap.load(bitmap_path)
    assert bitmap.solver.name == NAME and bitmap.total_bits <= Budget.bpw(2.75).max_bits(synthetic(2, layers=35).total_numel)
    code, stdout, _ = run(capsys, "train", "--profile", str(train_table), *common[:1], "200", *common[2:], "--resume")
    assert code == 0 and read_card(out / "policy.zip").timesteps == 200
    # bad input: one line, exit 2
    real_schema = tmp_path / "real.npz"
    dataclasses.replace(synthetic(3), feature_schema="bitalloc-features-v1").save(real_schema)
    for args, message in (
        (["train", "--profile", str(train_table), *common], "already holds a training run"),
        (["train", "--out", str(tmp_path / "x")], "give --models or --profile"),
        (["train", "--profile", str(train_table), "--out", str(tmp_path / "y"), "--bpw-range", "3", "2"], "bpw range"),
        (["train", "--profile", str(tmp_path / "none.npz"), "--out", str(tmp_path / "z")], "no sensitivity table"),
        (["solve", "--policy", str(tmp_path / "none.zip"), "--profile", str(new_table), "--bpw", "3"], "no policy at"),
        (["solve", "--policy", str(out / "policy.zip"), "--profile", str(real_schema), "--bpw", "3"], "feature schema mismatch"),
        (["solve", "--policy", str(out / "policy.zip"), "--profile", str(new_table), "--bpw", "0.5"], "infeasible"),
        (["solve", "--policy", str(out / "policy.zip"), "--bpw", "3"], "one of the arguments --profile --model is required"),
    ):
        code, _, err = run(capsys, *args)
        assert_one_line_error(code, err, message)


def test_cli_profiles_models_for_train_and_solve(tiny_model_dir, text_file, tmp_path, isolated_cache, capsys) -> None:
    profile = ["--corpus", str(text_file), "--samples", "4", "--seqlen", "32", "--no-progress"]
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--models", str(tiny_model_dir), "--timesteps", "120", "--out", str(out),
                          "--checkpoint-every", "100", *profile)
    assert code == 0 and read_card(out / "policy.zip").feature_schema == "bitalloc-features-v1"
    assert len(list((isolated_cache / "profiles").glob("*.npz"))) == 1
    code, stdout, _ = run(capsys, "solve", "--policy", str(out / "policy.zip"), "--model", str(tiny_model_dir), "--bpw", "3",
                          "--out", str(tmp_path / "b.json"), *profile)
    assert code == 0 and BitMap.load(tmp_path / "b.json").predicted_bpw <= 3
    assert len(list((isolated_cache / "profiles").glob("*.npz"))) == 1  # the same cached profile


def test_sac_settings_for_steadier_training_reach_the_model_and_survive_a_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from policies.artifact import load_checkpoint
    from policies.sac import sac_settings

    table = synthetic(1)
    default = TrainConfig(timesteps=200, seed=0, checkpoint_every=100, **SMALL)
    assert "gradient_steps" not in default.run_settings() and "target_entropy" not in default.run_settings()  # older runs' records hold
    config = dataclasses.replace(default, gradient_steps=2, target_entropy=-3.0, learning_rate=1e-4)
    assert config.run_settings()["gradient_steps"] == 2 and config.run_settings()["target_entropy"] == -3.0
    assert sac_settings(config)["target_entropy"] == -3.0 and sac_settings(default)["target_entropy"] == "auto"
    train([table], tmp_path, config, progress=False)
    with pytest.raises(BitallocError, match="other tables or settings"):  # a resume must keep them
        train([table], tmp_path, dataclasses.replace(config, target_entropy=-1.0, timesteps=300), resume=True, progress=False)
    path = train([table], tmp_path, dataclasses.replace(config, timesteps=300), resume=True, progress=False)
    assert read_card(path).timesteps == 300
    from envs.bitalloc_env import BitAllocEnv

    model = load_checkpoint(tmp_path / "checkpoints" / "sac_300_steps.zip", BitAllocEnv([table]), **sac_settings(config))
    assert model.gradient_steps == 2 and model.target_entropy == -3.0 and model.learning_rate == 1e-4
    for bad, message in (({"gradient_steps": 0}, "gradient steps must be 1 to 64"), ({"target_entropy": float("nan")}, "target entropy"),
                         ({"learning_rate": 0.0}, "learning rate must be in")):
        with pytest.raises(BitallocError, match=message):
            dataclasses.replace(default, **bad)
    code, _, err = run(capsys, "train", "--profile", str(tmp_path / "t.npz"), "--out", str(tmp_path / "x"), "--gradient-steps", "65")
    assert_one_line_error(code, err, "gradient steps must be 1 to 64")
