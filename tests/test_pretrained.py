"""Shipped policies (policies/pretrained/) by name, and ``bitalloc solve`` refusing --policy with --solver."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import policies.pretrained as pretrained
from allocator.errors import BitallocError
from allocator.table.bitmap import BitMap
from allocator.table.sensitivity import SensitivityTable
from policies.apply import NAME
from policies.artifact import load_policy, sidecar_path
from policies.sac import TrainConfig, train
from tests.cli_helpers import assert_one_line_error, run


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sac")
    config = TrainConfig(timesteps=120, seed=0, checkpoint_every=120, learning_starts=60, batch_size=16, net_arch=(16, 16))
    return train([SensitivityTable.synthetic(num_layers=14, seed=1)], out, config, progress=False)


@pytest.fixture
def shipped_dir(tiny_policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pretrained directory holding the tiny policy as ``tiny-sac`` (and a zip without sidecar, not listed)."""
    directory = tmp_path / "pretrained"
    directory.mkdir()
    shutil.copy(tiny_policy, directory / "tiny-sac.zip")
    shutil.copy(sidecar_path(tiny_policy), directory / "tiny-sac.json")
    shutil.copy(tiny_policy, directory / "no-sidecar.zip")
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", directory)
    return directory


def test_names_resolve_to_shipped_policies(shipped_dir: Path, tiny_policy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pretrained.shipped() == ["tiny-sac"]
    assert pretrained.resolve("tiny-sac") == shipped_dir / "tiny-sac.zip"
    assert pretrained.load("tiny-sac").card.zip_sha256 == load_policy(tiny_policy).card.zip_sha256
    # paths stay paths: a file, a run directory, anything ending in .zip or with a separator
    assert pretrained.resolve(tiny_policy) == tiny_policy
    assert pretrained.resolve(str(tiny_policy.parent)) == tiny_policy
    assert pretrained.resolve("missing.zip") == Path("missing.zip")
    assert pretrained.resolve("runs/sac") == Path("runs/sac")
    monkeypatch.chdir(tmp_path)  # a file in the working directory wins over a shipped name
    shutil.copy(tiny_policy, tmp_path / "tiny-sac")
    assert pretrained.resolve("tiny-sac") == Path("tiny-sac")


def test_unknown_name_is_one_line_listing_the_shipped(shipped_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BitallocError) as caught:
        pretrained.resolve("nope-sac")
    message = str(caught.value)
    assert "\n" not in message and "'nope-sac'" in message and "shipped: tiny-sac" in message and "no-sidecar" not in message
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path / "empty")
    with pytest.raises(BitallocError, match="none are shipped"):
        pretrained.resolve("nope-sac")


def test_cli_solve_takes_a_shipped_name(shipped_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "t.npz"
    SensitivityTable.synthetic(num_layers=21, seed=4).save(table)
    out = tmp_path / "bitmap.json"
    code, stdout, _ = run(capsys, "solve", "--policy", "tiny-sac", "--profile", str(table), "--bpw", "2.5", "--out", str(out))
    assert code == 0 and stdout.startswith(f"{NAME}: ")
    bitmap = BitMap.load(out)
    assert bitmap.solver.name == NAME and bitmap.solver.settings["policy"] == str(shipped_dir / "tiny-sac.zip")
    code, _, err = run(capsys, "solve", "--policy", "nope-sac", "--profile", str(table), "--bpw", "2.5")
    assert_one_line_error(code, err, "unknown policy 'nope-sac'")
    assert "tiny-sac" in err


def test_cli_solve_refuses_policy_with_solver(tiny_policy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "t.npz"
    SensitivityTable.synthetic(num_layers=14, seed=2).save(table)
    for solver in ("ilp", "greedy"):  # the default's name too: --solver given at all is the conflict
        code, _, err = run(capsys, "solve", "--policy", str(tiny_policy), "--solver", solver, "--profile", str(table), "--bpw", "2.5")
        assert_one_line_error(code, err, "not allowed with argument")
    # without --policy, no --solver still means the ILP, and --solver still picks one
    for args, name in (([], "ilp"), (["--solver", "greedy"], "greedy")):
        out = tmp_path / f"{name}.json"
        code, stdout, _ = run(capsys, "solve", "--profile", str(table), "--bpw", "2.5", "--out", str(out), *args)
        assert code == 0 and BitMap.load(out).solver.name == name


def test_the_shipped_smollm2_policy_allocates_a_profiled_model(loaded, corpus, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The real shipped artifact (trained on SmolLM2's table by benchmarks/policy.py) loads through
    every check and allocates a freshly profiled model (the tiny llama: same feature schema) within
    the budget, by name."""
    from allocator.measure.profile import profile_model
    from allocator.table.options import parse_options

    assert "smollm2-135m-sac" in pretrained.shipped()
    card = pretrained.load("smollm2-135m-sac").card
    assert [m["model"] for m in card.models] == ["smollm2-135m"]
    table_path = tmp_path / "tiny.npz"
    profile_model(loaded, corpus, parse_options(["xnor:group_size=128", "gptq2", "gptq4"]), samples=4, seqlen=32,
                  cache=False, progress=False).save(table_path)
    out = tmp_path / "bitmap.json"
    code, stdout, _ = run(capsys, "solve", "--policy", "smollm2-135m-sac", "--profile", str(table_path), "--bpw", "2.5", "--out", str(out))
    assert code == 0 and stdout.startswith(f"{NAME}: ")
    bitmap = BitMap.load(out)
    assert bitmap.solver.name == NAME and bitmap.solver.settings["trained_on"] == ["smollm2-135m"]
    assert bitmap.predicted_bpw <= 2.5 + 1e-9
