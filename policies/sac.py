"""Train a SAC allocation policy (stable-baselines3) on one or several sensitivity tables.

:func:`train` builds one :class:`envs.bitalloc_env.BitAllocEnv` over all the tables (one drawn per
episode, the budget drawn per episode from ``bpw_range``), trains SAC on it and writes into the
output directory::

    run.json                          what the run trains on (checked again on --resume)
    checkpoints/sac_<N>_steps.zip     snapshots every checkpoint_every steps, each with a .json sidecar
    checkpoints/sac_replay_buffer_<N>_steps.npz   its replay buffer as plain arrays
    logs/progress.csv                 the sb3 logger (and TensorBoard events if tensorboard is installed)
    policy.zip, policy.json           the final artifact (:mod:`policies.artifact`)
    best_policy.zip, best_policy.json the best checkpoint so far, as SB3's EvalCallback keeps a best model
    best.json                         its step count and score

"Best" is scored at every checkpoint without exploration noise: the deterministic policy allocates
every training table at :data:`EVAL_BPW` (inside ``bpw_range``), the allocation is repaired to the
budget as :func:`policies.apply.apply_policy` does, and the score is the mean over (table, budget) of
ln(table loss / LP-relaxation bound), the quality term of the reward without its budget terms
(lower is better; 0 would match the bound); :mod:`policies.best_checkpoint` keeps the best.

With ``resume`` the run continues from the latest checkpoint whose sidecar and hashes check out
(model and replay buffer), up to ``timesteps`` in total. Resuming never unpickles: the SAC model is
built by this code from the run's settings, and the checkpoint contributes only checked tensors,
counters and arrays (:func:`policies.artifact.restore_checkpoint`); checkpoints of older versions
(a pickled ``.pkl`` replay buffer, no training state in the sidecar) are skipped with a warning.
Training uses dense reward shaping by default (:mod:`envs.reward`: the same return, paid earlier),
which learns faster from the terminal-only quality signal.

Same-seed runs write byte-identical policies, checkpoints and sidecars on one machine and library
stack (:func:`policies.artifact.write_model_zip`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from allocator.errors import BitallocError
from allocator.solvers.base import MAX_BPW, Budget, Constraints
from allocator.solvers.repair import repair
from allocator.storage import write_json
from allocator.table.sensitivity import SensitivityTable
from envs.bitalloc_env import DEFAULT_BPW_RANGE, BitAllocEnv
from envs.observation import FeatureNormalization
from envs.reward import RewardConfig
from policies.apply import rollout
from policies.artifact import (
    MAX_BUFFER_SIZE,
    PolicyCard,
    TrainingState,
    check_policy_kwargs,
    file_sha256,
    load_checkpoint,
    network_kwargs,
    read_card,
    save_artifact,
    table_record,
    training_state,
    versions,
    write_model_zip,
    write_sidecar,
)
from policies.best_checkpoint import keep_if_better
from policies.replay_buffer import SUFFIX as BUFFER_SUFFIX
from policies.replay_buffer import save_replay_buffer

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
POLICY_FILE = "policy.zip"
EVAL_BPW = (2.0, 2.5, 3.0, 3.5)
"""Budgets the checkpoints are scored at (those inside the run's bpw range)."""
CHECKPOINT_PREFIX = "sac"
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}_(\d+)_steps\.zip$")


MAX_GRADIENT_STEPS = 64
"""Most gradient updates per environment step a run may ask for."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (the SAC hyperparameters are stable-baselines3's)."""

    timesteps: int = 20_000
    seed: int = 0
    bpw_range: tuple[float, float] = DEFAULT_BPW_RANGE
    constraints: Constraints = Constraints()
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(dense=True))
    net_arch: tuple[int, ...] = (64, 64)
    learning_rate: float = 3e-4
    buffer_size: int = 100_000
    learning_starts: int = 1_000
    """Random-action steps before the first update (capped at half of ``timesteps``)."""
    batch_size: int = 128
    gamma: float = 0.99
    gradient_steps: int = 1
    """Gradient updates per environment step (SB3's ``gradient_steps``)."""
    target_entropy: float | None = None
    """The entropy SAC's temperature steers the policy to (None: SB3's ``-(action dimensions)``, here -1); lower
    explores less."""
    checkpoint_every: int = 5_000
    device: str = "cpu"
    action_mapping: str = "price"
    """``"price"`` or ``"index"`` (:mod:`envs.bitalloc_env`)."""

    def __post_init__(self) -> None:
        if self.timesteps < 1 or self.checkpoint_every < 1 or self.batch_size < 1 or self.buffer_size < 1:
            raise BitallocError("timesteps, checkpoint_every, batch_size and buffer_size must be at least 1")
        if self.buffer_size > MAX_BUFFER_SIZE or not 0 <= self.seed < 2**32:
            raise BitallocError(f"the buffer size must be at most {MAX_BUFFER_SIZE} and the seed in 0..2**32-1")
        if not 1 <= self.gradient_steps <= MAX_GRADIENT_STEPS:
            raise BitallocError(f"gradient steps must be 1 to {MAX_GRADIENT_STEPS}, got {self.gradient_steps}")
        if self.target_entropy is not None and not math.isfinite(self.target_entropy):
            raise BitallocError(f"the target entropy must be a finite number, got {self.target_entropy}")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            raise BitallocError(f"the learning rate must be in (0, 1], got {self.learning_rate}")
        check_policy_kwargs({"net_arch": list(self.net_arch)}, "TrainConfig")  # what a sidecar may hold, so the policy loads again
        if not (all(math.isfinite(b) for b in self.bpw_range) and 0 < self.bpw_range[0] <= self.bpw_range[1] <= MAX_BPW):
            raise BitallocError(f"the bpw range must be finite with 0 < low <= high <= {MAX_BPW:g}, got {tuple(self.bpw_range)}")

    def run_settings(self) -> dict[str, Any]:
        """What a resumed run must share with the original (all but the step count, the checkpoint
        interval and the device)."""
        data = asdict(self)
        for key in ("timesteps", "checkpoint_every", "device"):  # free to change between sessions
            data.pop(key)
        for key, default in (("gradient_steps", 1), ("target_entropy", None)):  # runs from before these settings keep their record
            if data[key] == default:
                data.pop(key)
        data["constraints"] = self.constraints.as_dict()
        data["bpw_range"] = list(self.bpw_range)
        data["net_arch"] = list(self.net_arch)
        return data


def checkpoint_paths(directory: Path, steps: int) -> tuple[Path, Path]:
    """(zip, replay buffer) of the checkpoint at ``steps`` in ``directory`` (CheckpointCallback's names, an .npz buffer)."""
    return directory / f"{CHECKPOINT_PREFIX}_{steps}_steps.zip", directory / f"{CHECKPOINT_PREFIX}_replay_buffer_{steps}_steps{BUFFER_SUFFIX}"


def save_checkpoint(model: Any, directory: Path, card: PolicyCard) -> Path:
    """Write the checkpoint of ``model`` now: the zip, its replay buffer as arrays, and last the
    sidecar with both hashes and the training state (so a checkpoint cut short has no matching sidecar)."""
    zip_path, buffer = checkpoint_paths(directory, model.num_timesteps)
    write_model_zip(model, zip_path)
    save_replay_buffer(model.replay_buffer, buffer)
    write_sidecar(zip_path, replace(card, timesteps=model.num_timesteps, zip_sha256=file_sha256(zip_path),
                                    replay_buffer_sha256=file_sha256(buffer), training=TrainingState.of(model)))
    return zip_path


def _checkpoint_callback(card: PolicyCard, every: int, directory: Path):  # -> BaseCallback
    from stable_baselines3.common.callbacks import BaseCallback

    class SidecarCheckpointCallback(BaseCallback):
        """Every ``every`` calls, as SB3's CheckpointCallback: :func:`save_checkpoint` (SB3's would
        pickle the replay buffer and time-stamp the zip)."""

        def _on_step(self) -> bool:
            if self.n_calls % every == 0:
                save_checkpoint(self.model, directory, card)
            return True

    return SidecarCheckpointCallback()


def eval_budgets(bpw_range: Sequence[float]) -> list[float]:
    """The :data:`EVAL_BPW` budgets inside ``bpw_range`` (its midpoint when none is)."""
    low, high = bpw_range
    return [b for b in EVAL_BPW if low <= b <= high] or [(low + high) / 2]


def policy_score(model: Any, env: BitAllocEnv, budgets: Sequence[float]) -> float:
    """Mean over the env's tables and ``budgets`` (those each table can meet) of ln(repaired allocation's
    loss / LP bound), with deterministic actions (see the module doc)."""

    def act(observation: np.ndarray) -> np.ndarray:
        return np.asarray(model.predict(observation, deterministic=True)[0])

    scores = []
    for index, prepared in enumerate(env.models):
        # budgets below what the table's lightest options need are skipped; with none left, its mid-range budget
        feasible = [{"bpw": b} for b in budgets if Budget.bpw(b).max_bits(prepared.problem.total_numel) >= prepared.min_bits]
        for budget in feasible or [{"budget_bits": (prepared.min_bits + prepared.max_bits) // 2}]:
            info = rollout(env, act, {"table": index, **budget})
            problem = env.problem
            loss = prepared.reward_problem.total_cost(repair(problem, info["raw_choice"]))  # the reward table's loss
            bound = prepared.reward_relaxation.bound(problem.budget_bits)
            scores.append(math.log((max(loss, 0.0) + prepared.eps) / (max(bound, 0.0) + prepared.eps)))
    return float(np.mean(scores))


def _best_callback(card: PolicyCard, every: int, out_dir: Path, eval_env: BitAllocEnv, budgets: Sequence[float]):  # -> BaseCallback
    from stable_baselines3.common.callbacks import BaseCallback

    class BestPolicyCallback(BaseCallback):
        """Every ``every`` steps: score the policy (:func:`policy_score`), log it as ``eval/score``, and
        save it as the best policy when it beats the best so far (kept across resumed sessions)."""

        def _on_step(self) -> bool:
            if self.n_calls % every:
                return True
            score = policy_score(self.model, eval_env, budgets)
            self.logger.record("eval/score", score)
            keep_if_better(out_dir, self.num_timesteps, score, budgets,
                           lambda path: save_artifact(self.model, path, replace(card, timesteps=self.num_timesteps)))
            return True

    return BestPolicyCallback()


def _stats_callback():  # -> BaseCallback
    from stable_baselines3.common.callbacks import BaseCallback

    class AllocationStatsCallback(BaseCallback):
        """Logs per finished episode the loss over its reference and the budget use before projection."""

        def _on_step(self) -> bool:
            for info, done in zip(self.locals["infos"], self.locals["dones"]):
                if done and "reference_loss" in info:
                    self.logger.record_mean("allocation/loss_ratio", info["loss"] / max(info["reference_loss"], 1e-30))
                    self.logger.record_mean("allocation/budget_use", info["raw_bits"] / info["budget_bits"])
                    self.logger.record_mean("allocation/projected", float(info["projected"]))
            return True

    return AllocationStatsCallback()


def latest_checkpoint(directory: Path) -> tuple[Path, Path] | None:
    """The newest (zip, replay buffer) in ``directory`` whose sidecar and hashes check out and that
    can be resumed without unpickling; others are skipped with a warning (older versions' checkpoints
    too: their pickled ``.pkl`` replay buffers are never loaded)."""
    found = sorted(((int(m.group(1)), p) for p in directory.glob("*.zip") if (m := _CHECKPOINT.match(p.name))), reverse=True)
    for steps, path in found:
        buffer = checkpoint_paths(directory, steps)[1]
        try:
            card = read_card(path)
            training_state(card, path)
        except BitallocError as exc:
            log.warning("skipping checkpoint %s: %s", path.name, exc)
            continue
        if not buffer.is_file() and buffer.with_suffix(".pkl").is_file():
            log.warning("skipping checkpoint %s: its replay buffer is a pickle (.pkl), which is never loaded", path.name)
        elif buffer.is_file() and card.replay_buffer_sha256 == file_sha256(buffer):
            return path, buffer
        else:
            log.warning("skipping checkpoint %s: its replay buffer is missing or does not match", path.name)
    return None


def _resume(latest: tuple[Path, Path], card: PolicyCard, config: TrainConfig, env: BitAllocEnv) -> Any:  # -> SAC
    """The run's model at its checkpoint ``latest``, built from ``config`` (never unpickled)."""
    zip_path, buffer = latest
    found = read_card(zip_path)
    state = training_state(found, zip_path)
    if found.run_fields() != card.run_fields():
        differs = next(k for k, v in card.run_fields().items() if found.run_fields().get(k) != v)
        raise BitallocError(f"{zip_path}: a checkpoint of another run (its {differs} differs); move it away or choose another --out")
    if state.buffer_size > config.buffer_size or state.learning_starts > config.learning_starts:
        raise BitallocError(f"{zip_path}: buffer size {state.buffer_size} / learning starts {state.learning_starts} exceed the run's settings")
    return load_checkpoint(zip_path, env, buffer, device=config.device, **sac_settings(config))


def sac_settings(config: TrainConfig) -> dict[str, Any]:
    """The SAC hyperparameters of ``config`` a fresh or a resumed model is built with."""
    return {"learning_rate": config.learning_rate, "batch_size": config.batch_size, "gamma": config.gamma,
            "gradient_steps": config.gradient_steps, "target_entropy": "auto" if config.target_entropy is None else config.target_entropy}


def _run_record(tables: Sequence[SensitivityTable], config: TrainConfig, reward_tables: Sequence[SensitivityTable] | None = None,
                reward_loss: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"tables": [table_record(t) for t in tables], "settings": config.run_settings()}
    if reward_tables is not None:  # runs rewarded on their own tables keep the record they always had
        record["reward_tables"] = [table_record(t) for t in reward_tables]
        record["reward_loss"] = reward_loss
    return record


def _logger(directory: Path):  # -> stable_baselines3 Logger
    from stable_baselines3.common.logger import configure

    formats = ["csv"]
    if importlib.util.find_spec("tensorboard") is not None:
        formats.append("tensorboard")
    return configure(str(directory), formats)


def train(
    tables: Sequence[SensitivityTable],
    out_dir: Path | str,
    config: TrainConfig = TrainConfig(),
    resume: bool = False,
    progress: bool = True,
    reward_tables: Sequence[SensitivityTable] | None = None,
    reward_loss: str | None = None,
) -> Path:
    """Train (or with ``resume`` continue) a policy; returns the path of ``policy.zip`` in ``out_dir``.

    With ``reward_tables`` (one per table, same layers, options and bits) the policy observes ``tables`` and is
    rewarded (and its checkpoints scored) on the reward tables' ``reward_loss``: features-only training observes the
    features tables of the training models and is scored on their measured tables (:mod:`envs.bitalloc_env`)."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import CallbackList

    tables = list(tables)
    if not tables:
        raise BitallocError("training needs at least one sensitivity table")
    out_dir = Path(out_dir)
    run_path = out_dir / RUN_FILE
    record = _run_record(tables, config, reward_tables, reward_loss)
    if run_path.is_file():
        if not resume:
            raise BitallocError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")
        previous = json.loads(run_path.read_text())
        if previous != record:
            raise BitallocError(f"{out_dir} holds a run on other tables or settings than these; --resume needs the same ones")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_path, record)

    normalization = FeatureNormalization.fit(tables)
    env = BitAllocEnv(tables, bpw_range=config.bpw_range, constraints=config.constraints, reward=config.reward, normalization=normalization,
                      action_mapping=config.action_mapping, reward_tables=reward_tables, reward_loss=reward_loss)
    policy_kwargs = {"net_arch": list(config.net_arch)}
    card = PolicyCard(
        normalization=normalization,
        observation_names=env.observation_names,
        models=[table_record(t) for t in tables],
        bpw_range=config.bpw_range,
        seed=config.seed,
        timesteps=0,
        constraints=config.constraints.as_dict(),
        reward=config.reward,
        policy_kwargs=policy_kwargs,
        action_mapping=config.action_mapping,
        observation_version=env.observation_version,
        versions=versions(),
    )
    checkpoints = out_dir / CHECKPOINTS
    latest = latest_checkpoint(checkpoints) if resume and checkpoints.is_dir() else None
    if latest is not None:
        model = _resume(latest, card, config, env)
        log.info("resuming from %s (%d steps)", latest[0].name, model.num_timesteps)
    else:
        if resume:
            log.info("no usable checkpoint in %s; starting from scratch", checkpoints)
        model = SAC(
            "MlpPolicy",
            env,
            buffer_size=min(config.buffer_size, config.timesteps),
            learning_starts=min(config.learning_starts, config.timesteps // 2),
            **sac_settings(config),
            policy_kwargs=network_kwargs(policy_kwargs),  # a fresh dict: SAC adds its own keys to the one it is given
            seed=config.seed,
            device=config.device,
        )
    model.set_logger(_logger(out_dir / LOGS))
    remaining = config.timesteps - model.num_timesteps
    if remaining > 0:
        every = min(config.checkpoint_every, config.timesteps)
        budgets = eval_budgets(config.bpw_range)
        eval_env = BitAllocEnv(tables, bpw_range=config.bpw_range, constraints=config.constraints, reward=config.reward,
                               normalization=normalization, action_mapping=config.action_mapping, reward_tables=reward_tables,
                               reward_loss=reward_loss)
        callbacks = CallbackList([_checkpoint_callback(card, every, checkpoints), _best_callback(card, every, out_dir, eval_env, budgets),
                                  _stats_callback()])
        model.learn(total_timesteps=remaining, callback=callbacks, reset_num_timesteps=latest is None, progress_bar=progress)
    return save_artifact(model, out_dir / POLICY_FILE, replace(card, timesteps=model.num_timesteps))
