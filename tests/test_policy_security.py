"""A tampered run directory or policy file never runs code: ``bitalloc train --resume`` and
``bitalloc solve --policy`` unpickle nothing, and every sidecar field is checked.

The attacker here can write the run directory, so can rewrite a file and the hash its sidecar
records for it. Each payload is a pickle whose ``__reduce__`` creates a marker file when
unpickled; the marker must never appear. A tampered input either gives a one-line error (exit 2)
or is ignored (a skipped checkpoint, SB3's unused ``data`` entry) while the run goes on.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from allocator.errors import BitallocError
from allocator.table.sensitivity import SensitivityTable
from policies.artifact import file_sha256, load_policy, read_card, sidecar_path
from tests.cli_helpers import assert_one_line_error, run

STEPS, RESUMED_STEPS, EVERY = 120, 180, 60
"""The tiny run: checkpoints at 60 and 120 steps; resumed to 180."""


class Payload:
    """Unpickling this creates ``marker`` (a stand-in for ``os.system``: any call would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run trained through the CLI (so ``--resume`` with the same flags fits it), and its table."""
    from allocator.cli import main

    root = tmp_path_factory.mktemp("secure")
    SensitivityTable.synthetic(num_layers=14, seed=1).save(root / "table.npz")
    assert main(train_args(root / "run", root, STEPS)) == 0
    return root


def train_args(out: Path, root: Path, steps: int, resume: bool = False) -> list[str]:
    return ["train", "--profile", str(root / "table.npz"), "--timesteps", str(steps), "--seed", "0", "--checkpoint-every", str(EVERY),
            "--out", str(out), "--no-progress", *(["--resume"] if resume else [])]


@pytest.fixture
def work(base_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the run directory to tamper with, its table beside it (and the marker)."""
    shutil.copytree(base_run / "run", tmp_path / "run")
    shutil.copy(base_run / "table.npz", tmp_path / "table.npz")
    return tmp_path / "run"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def checkpoint(run_dir: Path, steps: int) -> tuple[Path, Path]:
    return run_dir / "checkpoints" / f"sac_{steps}_steps.zip", run_dir / "checkpoints" / f"sac_replay_buffer_{steps}_steps.npz"


def edit_sidecar(zip_path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads(sidecar_path(zip_path).read_text())
    change(data)
    sidecar_path(zip_path).write_text(json.dumps(data))


def rewrite_zip(zip_path: Path, replace: dict[str, bytes]) -> None:
    """Replace members of ``zip_path`` and record the new hash in its sidecar, as an attacker can."""
    with zipfile.ZipFile(zip_path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, data in members:
            archive.writestr(name, replace.get(name, data))
    edit_sidecar(zip_path, lambda d: d.update(zip_sha256=file_sha256(zip_path)))


def resume(capsys: pytest.CaptureFixture, run_dir: Path) -> tuple[int, str, str]:
    """``bitalloc train --resume`` on ``run_dir`` to :data:`RESUMED_STEPS` (the table lies beside it)."""
    return run(capsys, *train_args(run_dir, run_dir.parent, RESUMED_STEPS, resume=True))


def test_the_payload_runs_when_unpickled(marker: Path) -> None:
    """The payload is live: unpickling it does create the marker (so the tests below would see it)."""
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.is_file()


def test_a_normal_resume_continues_and_is_deterministic(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import cloudpickle
    import torch
    from stable_baselines3 import SAC

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("unpickling while resuming")

    for module, name in ((pickle, "load"), (pickle, "loads"), (cloudpickle, "load"), (cloudpickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(SAC, "load", refuse)
    monkeypatch.setattr(SAC, "load_replay_buffer", refuse)
    real_load = torch.load

    def weights_only(*args: Any, **kwargs: Any) -> Any:
        assert kwargs.get("weights_only") is True, "torch.load without weights_only"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only)
    again = tmp_path / "again"
    shutil.copytree(work, again)
    for run_dir in (work, again):
        code, _, err = resume(capsys, run_dir)
        assert code == 0, err
        assert read_card(run_dir / "policy.zip").timesteps == RESUMED_STEPS
        card = read_card(checkpoint(run_dir, RESUMED_STEPS)[0])
        assert card.training is not None and card.training.num_timesteps == RESUMED_STEPS
        assert card.training.n_updates > read_card(checkpoint(run_dir, STEPS)[0]).training.n_updates  # training went on
    # the same checkpoint resumed twice: the same bytes
    assert (work / "policy.zip").read_bytes() == (again / "policy.zip").read_bytes()
    assert checkpoint(work, RESUMED_STEPS)[1].read_bytes() == checkpoint(again, RESUMED_STEPS)[1].read_bytes()


def test_solve_with_the_policy_still_works(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = tmp_path / "other.npz"
    SensitivityTable.synthetic(num_layers=21, seed=4).save(table)
    code, stdout, err = run(capsys, "solve", "--policy", str(work / "policy.zip"), "--profile", str(table), "--bpw", "2.5",
                            "--out", str(tmp_path / "b.json"))
    assert code == 0 and stdout.startswith("sac-policy: "), err


# --- (a) the replay buffer ---


def test_a_pickled_replay_buffer_is_never_loaded(work: Path, marker: Path, capsys: pytest.CaptureFixture,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A .pkl buffer (SB3's format, an older version's, or an attacker's) with its hash in the
    sidecar: the checkpoint is skipped with a warning and the run resumes from the one before."""
    zip_path, npz = checkpoint(work, STEPS)
    npz.unlink()
    pkl = npz.with_suffix(".pkl")
    pkl.write_bytes(pickle.dumps(Payload(marker)))
    edit_sidecar(zip_path, lambda d: d.update(replay_buffer_sha256=file_sha256(pkl)))
    with caplog.at_level(logging.INFO, logger="policies.sac"):
        code, _, err = resume(capsys, work)
    assert code == 0, err
    assert not marker.exists()
    assert "its replay buffer is a pickle (.pkl), which is never loaded" in caplog.text
    assert f"resuming from sac_{EVERY}_steps.zip" in caplog.text
    assert read_card(work / "policy.zip").timesteps == RESUMED_STEPS


def test_a_pickle_in_place_of_the_npz_is_refused(work: Path, marker: Path, capsys: pytest.CaptureFixture) -> None:
    zip_path, npz = checkpoint(work, STEPS)
    npz.write_bytes(pickle.dumps(Payload(marker)))
    edit_sidecar(zip_path, lambda d: d.update(replay_buffer_sha256=file_sha256(npz)))
    code, _, err = resume(capsys, work)
    assert_one_line_error(code, err, "not a replay buffer written by this code")
    assert not marker.exists()


def test_an_object_array_in_the_npz_is_refused(work: Path, marker: Path, capsys: pytest.CaptureFixture) -> None:
    """numpy pickles object arrays inside .npy members; the dtype check refuses them unread."""
    zip_path, npz = checkpoint(work, STEPS)
    with np.load(npz) as stored:
        arrays = {name: stored[name] for name in stored.files}
    payload = np.empty(arrays["observations"].shape, dtype=object)
    payload.fill(Payload(marker))
    with open(npz, "wb") as handle:
        np.savez(handle, **{**arrays, "observations": payload})
    assert not marker.exists()  # writing it ran nothing
    edit_sidecar(zip_path, lambda d: d.update(replay_buffer_sha256=file_sha256(npz)))
    code, _, err = resume(capsys, work)
    assert_one_line_error(code, err, "observations is object")
    assert not marker.exists()


# --- (b) the checkpoint zip ---


def _payload_data(zip_path: Path, marker: Path) -> bytes:
    """SB3's ``data`` entry with every cloudpickled attribute replaced by the payload."""
    with zipfile.ZipFile(zip_path) as archive:
        data = json.loads(archive.read("data"))
    evil = base64.b64encode(pickle.dumps(Payload(marker))).decode()
    for value in data.values():
        if isinstance(value, dict) and ":serialized:" in value:
            value[":serialized:"] = evil
    return json.dumps(data).encode()


def test_a_payload_in_the_zip_data_entry_is_never_read(work: Path, marker: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SB3.load would unpickle ``data``; resuming and applying never read it, and the run goes on."""
    for steps in (EVERY, STEPS):
        zip_path = checkpoint(work, steps)[0]
        rewrite_zip(zip_path, {"data": _payload_data(zip_path, marker)})
    rewrite_zip(work / "policy.zip", {"data": _payload_data(work / "policy.zip", marker)})
    table = tmp_path / "other.npz"
    SensitivityTable.synthetic(num_layers=21, seed=4).save(table)
    code, stdout, err = run(capsys, "solve", "--policy", str(work / "policy.zip"), "--profile", str(table), "--bpw", "2.5",
                            "--out", str(tmp_path / "b.json"))
    assert code == 0 and stdout.startswith("sac-policy: "), err
    code, _, err = resume(capsys, work)
    assert code == 0, err
    assert read_card(work / "policy.zip").timesteps == RESUMED_STEPS
    assert not marker.exists()


@pytest.mark.parametrize("member", ["policy.pth", "actor.optimizer.pth", "critic.optimizer.pth", "ent_coef_optimizer.pth"])
def test_a_payload_in_a_pth_entry_is_refused(work: Path, marker: Path, member: str, capsys: pytest.CaptureFixture) -> None:
    """The .pth entries go through torch.load(weights_only=True): a pickled call is refused."""
    import torch

    evil = io.BytesIO()
    torch.save({"state": Payload(marker)}, evil)
    for steps in (EVERY, STEPS):
        rewrite_zip(checkpoint(work, steps)[0], {member: evil.getvalue()})
    code, _, err = resume(capsys, work)
    assert_one_line_error(code, err, "not a stable-baselines3 SAC zip of tensors (UnpicklingError")
    assert not marker.exists()


def test_an_optimizer_state_of_another_shape_is_refused(work: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    zip_path = checkpoint(work, STEPS)[0]
    with zipfile.ZipFile(zip_path) as archive:
        state = torch.load(io.BytesIO(archive.read("actor.optimizer.pth")), weights_only=True)
    state["state"][0]["exp_avg"] = torch.zeros(3, 3)
    changed = io.BytesIO()
    torch.save(state, changed)
    rewrite_zip(zip_path, {"actor.optimizer.pth": changed.getvalue()})
    code, _, err = resume(capsys, work)
    assert_one_line_error(code, err, "actor.optimizer.pth is not an optimizer state for the network")


# --- (c, d) the sidecar's policy_kwargs, and every other field ---


@pytest.mark.parametrize(("policy_kwargs", "message"), [
    ({"net_arch": [64, 64], "activation_fn": "os.system"}, "activation_fn 'os.system' is not one of relu, tanh"),
    ({"net_arch": [64, 64], "activation_fn": "torch.nn.ReLU"}, "activation_fn 'torch.nn.ReLU' is not one of"),
    ({"net_arch": [2e9, 2e9]}, "net_arch must be a list of 1 to 8 layer widths, each 1 to 4096"),
    ({"net_arch": [2_000_000_000, 2_000_000_000]}, "net_arch must be a list of 1 to 8 layer widths"),
    ({"net_arch": [64, 64], "features_extractor_class": "os.system"}, "policy_kwargs.features_extractor_class is not a field"),
])
def test_policy_kwargs_from_a_sidecar_are_checked(work: Path, tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture,
                                                  caplog: pytest.LogCaptureFixture, policy_kwargs: dict[str, Any], message: str) -> None:
    """``solve --policy``: one line, exit 2, before any network is built. ``train --resume``: the
    checkpoints are skipped with that line as the warning, and the run starts again from scratch."""
    for zip_path in (work / "policy.zip", checkpoint(work, EVERY)[0], checkpoint(work, STEPS)[0]):
        edit_sidecar(zip_path, lambda d: d.update(policy_kwargs=policy_kwargs))
    table = tmp_path / "other.npz"
    SensitivityTable.synthetic(num_layers=21, seed=4).save(table)
    code, _, err = run(capsys, "solve", "--policy", str(work / "policy.zip"), "--profile", str(table), "--bpw", "2.5")
    assert_one_line_error(code, err, message)
    with caplog.at_level(logging.INFO, logger="policies.sac"):
        code, _, err = resume(capsys, work)
    assert code == 0, err
    assert f"skipping checkpoint sac_{STEPS}_steps.zip" in caplog.text and message in caplog.text
    assert "no usable checkpoint" in caplog.text and read_card(work / "policy.zip").timesteps == RESUMED_STEPS
    assert not marker.exists()


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(seed="3"), "seed must be an integer"),
    (lambda d: d.update(seed=True), "seed must be an integer"),
    (lambda d: d.update(seed=2**40), "seed must be an integer 0..4294967295"),
    (lambda d: d.update(timesteps=-1), "timesteps must be an integer >= 0"),
    (lambda d: d.update(schema_version=True), "sidecar schema True"),
    (lambda d: d.update(bpw_range=[3.0, 2.0]), "bpw_range must be [low, high]"),
    (lambda d: d.update(bpw_range=["2", 3]), "bpw_range must be [low, high]"),
    (lambda d: d["models"][0].update(layers="14"), "models[0].layers must be an integer"),
    (lambda d: d["models"][0].update(extra=1), "models[0].extra is not a field"),
    (lambda d: d.update(constraints={"tie": "yes"}), "constraints.tie must be true or false"),
    (lambda d: d.update(constraints={"max_bpw": {"q": "4"}}), "constraints.max_bpw must be a number"),
    (lambda d: d["reward"].update(cliff="2"), "reward.cliff must be a finite number"),
    (lambda d: d["reward"].update(dense=1), "reward.dense must be true or false"),
    (lambda d: d["reward"].update(evil=1), "reward.evil is not a field"),
    (lambda d: d["normalization"].update(mean=["x"] * 11), "normalization.mean[0] must be a finite number"),
    (lambda d: d["normalization"].update(std=[float("nan")] * 11), "normalization.std[0] must be a finite number"),
    (lambda d: d["normalization"].update(feature_names=[1] * 11), "normalization.feature_names[0] must be a string"),
    (lambda d: d.update(observation_names="abc"), "observation_names must be a list"),
    (lambda d: d.update(zip_sha256=["x"]), "zip_sha256 must be a sha256 hex digest"),
    (lambda d: d.update(replay_buffer_sha256=0), "replay_buffer_sha256 must be a sha256 hex digest"),
    (lambda d: d.update(versions={"torch": 2}), "versions.torch must be a string"),
    (lambda d: d.update(action_mapping=["price"]), "action_mapping ['price']"),
    (lambda d: d.update(extra={"__reduce__": "os.system"}), "sidecar.extra is not a field"),
    (lambda d: d["training"].update(buffer_size=10**12), "training.buffer_size must be an integer 1..10000000"),
    (lambda d: d["training"].update(log_ent_coef="0.1"), "training.log_ent_coef must be a finite number"),
    (lambda d: d["training"].update(n_updates=-5), "training.n_updates must be an integer >= 0"),
    (lambda d: d["training"].pop("episode_num"), "training.episode_num is missing"),
])
def test_every_sidecar_field_is_checked(work: Path, change: Callable[[dict[str, Any]], Any], message: str) -> None:
    zip_path = checkpoint(work, STEPS)[0]
    edit_sidecar(zip_path, change)
    with pytest.raises(BitallocError, match=f"^{zip_path.with_suffix('.json')}: ") as caught:
        read_card(zip_path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_old_checkpoints_are_skipped_not_loaded(work: Path, marker: Path, capsys: pytest.CaptureFixture,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints as older versions wrote them (no training state, a pickled buffer) are never
    loaded: skipped with a warning, and the run starts again."""
    for steps in (EVERY, STEPS):
        zip_path, npz = checkpoint(work, steps)
        npz.unlink()
        npz.with_suffix(".pkl").write_bytes(pickle.dumps(Payload(marker)))
        digest = file_sha256(npz.with_suffix(".pkl"))
        edit_sidecar(zip_path, lambda d, digest=digest: (d.pop("training"), d.update(replay_buffer_sha256=digest)))
    # scoring one (benchmarks/policy.py) still works: its network alone, from policy.pth
    from envs.bitalloc_env import BitAllocEnv
    from policies.artifact import load_checkpoint

    card = read_card(checkpoint(work, STEPS)[0])
    env = BitAllocEnv([SensitivityTable.synthetic(num_layers=14, seed=1)], normalization=card.normalization, action_mapping=card.action_mapping)
    model = load_checkpoint(checkpoint(work, STEPS)[0], env)
    assert model.num_timesteps == STEPS and model.predict(env.reset(seed=0)[0], deterministic=True)[0].shape == (1,)
    with pytest.raises(BitallocError, match="without training state"):
        load_checkpoint(checkpoint(work, STEPS)[0], env, checkpoint(work, STEPS)[1].with_suffix(".pkl"))
    with caplog.at_level(logging.INFO, logger="policies.sac"):
        code, _, err = resume(capsys, work)
    assert code == 0, err
    assert "a checkpoint without training state (an older version's); it is never resumed from" in caplog.text
    assert "no usable checkpoint" in caplog.text and read_card(work / "policy.zip").timesteps == RESUMED_STEPS
    assert not marker.exists()


def test_a_checkpoint_of_another_run_is_refused(work: Path, capsys: pytest.CaptureFixture) -> None:
    """A checkpoint whose (checked) sidecar describes other settings than run.json is not resumed."""
    edit_sidecar(checkpoint(work, STEPS)[0], lambda d: d.update(policy_kwargs={"net_arch": [8]}))
    code, _, err = resume(capsys, work)
    assert_one_line_error(code, err, "a checkpoint of another run (its policy_kwargs differs)")


def test_the_shipped_policy_still_loads() -> None:
    """The shipped sidecar (written before these checks) passes them, and its network is the one it describes."""
    from policies import pretrained

    policy = load_policy(pretrained.resolve("smollm2-135m-sac"))
    assert policy.card.policy_kwargs == {"net_arch": [64, 64]} and policy.card.training is None


# --- the replay buffer file on its own ---


def _buffer(size: int = 8) -> Any:
    from gymnasium import spaces
    from stable_baselines3.common.buffers import ReplayBuffer

    observations = spaces.Box(-5.0, 5.0, shape=(4,), dtype=np.float32)
    return ReplayBuffer(size, observations, spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32), device="cpu")


def _filled(steps: int, size: int = 8) -> Any:
    buffer = _buffer(size)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        buffer.add(rng.uniform(-5, 5, (1, 4)).astype(np.float32), rng.uniform(-5, 5, (1, 4)).astype(np.float32),
                   rng.uniform(-1, 1, (1, 1)).astype(np.float32), np.array([rng.normal()]), np.array([rng.random() < 0.2]), [{}])
    return buffer


@pytest.mark.parametrize("steps", [0, 5, 8, 11])
def test_replay_buffer_round_trip(tmp_path: Path, steps: int) -> None:
    from policies.replay_buffer import load_replay_buffer, save_replay_buffer

    original = _filled(steps)
    path = save_replay_buffer(original, tmp_path / "buffer.npz")
    restored = _buffer()
    load_replay_buffer(restored, path)
    assert (restored.pos, restored.full) == (original.pos, original.full)
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        assert np.array_equal(getattr(restored, name), getattr(original, name)), name


@pytest.mark.parametrize(("edit", "message"), [
    (lambda a: a.update(rewards=a["rewards"].astype(np.float64)), "rewards is float64"),
    (lambda a: a.update(observations=np.zeros((9, 1, 4), np.float32), next_observations=np.zeros((9, 1, 4), np.float32)), "N <= 8"),
    (lambda a: a.update(actions=np.zeros((5, 1, 2), np.float32)), "actions is float32 (5, 1, 2)"),
    (lambda a: a.update(extra=np.zeros(1)), "'extra.npy' differs"),
    (lambda a: a.pop("timeouts"), "'timeouts.npy' differs"),
    (lambda a: a.update(pos=np.array(3)), "pos 3 / full False do not fit 5 stored transitions"),
    (lambda a: a.update(pos=np.array([5])), "pos is int64 (1,)"),
    (lambda a: a.update(full=np.array(True)), "do not fit"),
    (lambda a: a["observations"].__setitem__((0, 0, 0), np.nan), "observations holds non-finite values"),
    (lambda a: a["observations"].__setitem__((0, 0, 0), 6.0), "observations holds values outside the bounds"),
    (lambda a: a["actions"].__setitem__((0, 0, 0), 1.5), "actions holds values outside the bounds"),
    (lambda a: a["dones"].__setitem__((0, 0), 0.5), "dones holds values other than 0 and 1"),
])
def test_a_bad_replay_buffer_file_is_refused(tmp_path: Path, edit: Callable[[dict[str, np.ndarray]], Any], message: str) -> None:
    from policies.replay_buffer import load_replay_buffer, save_replay_buffer

    path = save_replay_buffer(_filled(5), tmp_path / "buffer.npz")
    with np.load(path) as stored:
        arrays = {name: stored[name].copy() for name in stored.files}
    edit(arrays)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(BitallocError, match="^" + str(path)) as caught:
        load_replay_buffer(_buffer(), path)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(BitallocError, match="pickled buffers"):
        load_replay_buffer(_buffer(), path.with_suffix(".pkl"))
