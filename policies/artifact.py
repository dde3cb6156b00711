"""The policy artifact: a stable-baselines3 SAC zip plus a JSON sidecar that says what it is.

``policy.zip`` is what ``SAC.save`` writes (usable with stable-baselines3 directly);
``policy.json`` beside it (:class:`PolicyCard`) records everything needed to use the policy on a
new model and to refuse it where it does not fit:

- ``schema_version`` (:data:`ARTIFACT_SCHEMA_VERSION`), ``algorithm``, library versions;
- ``feature_schema`` and ``observation_version``: the layer-feature schema of the profiles and the
  observation layout of the environment the policy was trained on, with the observation's column
  names; a table or code with another schema is refused (one :class:`BitallocError` line);
- ``normalization``: the layer-feature normalization fitted on the training tables
  (:class:`envs.observation.FeatureNormalization`), applied unchanged to any new model;
- ``models``: per training table the model, table key, option labels and layer count;
- ``bpw_range``, ``seed``, ``timesteps``, ``constraints``, ``reward`` and ``policy_kwargs``;
- ``zip_sha256`` (and for checkpoints ``replay_buffer_sha256``): the hash of the files it describes.

Trust: a zip is only ever opened after its sidecar has been read and checked (schema versions,
feature schema, hash). Applying a policy (:func:`load_policy`) never unpickles anything: it reads
the network weights from the zip's ``policy.pth`` with ``torch.load(weights_only=True)`` and
rebuilds the network from the sidecar. Only resuming a training run from one of its own
checkpoints (:func:`load_checkpoint`) goes through ``SAC.load``, which unpickles, and only after
the sidecar's hash matched.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator import __version__
from allocator.errors import BitallocError
from allocator.solvers.base import Constraints
from allocator.storage import atomic_path, write_json
from allocator.table.sensitivity import SensitivityTable
from envs.bitalloc_env import ACTION_MAPPINGS
from envs.observation import OBS_CLIP, OBSERVATION_VERSION, FeatureNormalization, observation_names
from envs.reward import RewardConfig

if TYPE_CHECKING:
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import VecEnv
    from stable_baselines3.sac.policies import SACPolicy

ARTIFACT_SCHEMA_VERSION = 1
ALGORITHM = "SAC"
SIDECAR_SUFFIX = ".json"


def sidecar_path(zip_path: Path | str) -> Path:
    """``policy.zip`` -> ``policy.json``."""
    return Path(zip_path).with_suffix(SIDECAR_SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def table_record(table: SensitivityTable) -> dict[str, Any]:
    """How the sidecar names a training table."""
    return {"model": table.key.model, "table_key": table.key.digest(), "option_labels": table.labels, "layers": table.num_layers}


def constraints_from_dict(data: Mapping[str, Any]) -> Constraints:
    known = {"loss", "tie", "min_bpw", "max_bpw"}
    return Constraints(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class PolicyCard:
    """The sidecar of a policy zip (see the module doc)."""

    normalization: FeatureNormalization
    observation_names: list[str]
    models: list[dict[str, Any]]
    bpw_range: tuple[float, float]
    seed: int
    timesteps: int
    constraints: dict[str, Any]
    reward: RewardConfig
    policy_kwargs: dict[str, Any]
    action_mapping: str = "index"
    """How an action picks a unit's option (:data:`envs.bitalloc_env.ACTION_MAPPINGS`); sidecars
    written before the choice existed used ``"index"``."""
    zip_sha256: str = ""
    replay_buffer_sha256: str = ""
    observation_version: str = OBSERVATION_VERSION
    algorithm: str = ALGORITHM
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def feature_schema(self) -> str:
        return self.normalization.feature_schema

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": ARTIFACT_SCHEMA_VERSION,
            "algorithm": self.algorithm,
            "feature_schema": self.feature_schema,
            "observation_version": self.observation_version,
            "observation_names": list(self.observation_names),
            "normalization": self.normalization.as_dict(),
            "models": self.models,
            "bpw_range": list(self.bpw_range),
            "seed": self.seed,
            "timesteps": self.timesteps,
            "constraints": self.constraints,
            "reward": self.reward.as_dict(),
            "policy_kwargs": self.policy_kwargs,
            "action_mapping": self.action_mapping,
            "zip_sha256": self.zip_sha256,
            "replay_buffer_sha256": self.replay_buffer_sha256,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> PolicyCard:
        """Parse and check a sidecar; any problem is a one-line :class:`BitallocError`."""
        if not isinstance(data, Mapping):
            raise BitallocError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version != ARTIFACT_SCHEMA_VERSION:
            raise BitallocError(f"{source}: policy sidecar schema {version!r}, this code reads {ARTIFACT_SCHEMA_VERSION}")
        if data.get("algorithm") != ALGORITHM:
            raise BitallocError(f"{source}: algorithm {data.get('algorithm')!r}, this code runs {ALGORITHM}")
        if data.get("observation_version") != OBSERVATION_VERSION:
            raise BitallocError(
                f"{source}: the policy observes {data.get('observation_version')!r}, this code builds {OBSERVATION_VERSION!r}; train it again"
            )
        try:
            normalization = FeatureNormalization.from_dict(data["normalization"])
            if data["feature_schema"] != normalization.feature_schema:
                raise BitallocError(f"{source}: feature_schema {data['feature_schema']!r} disagrees with its normalization")
            low, high = (float(b) for b in data["bpw_range"])
            card = cls(
                normalization=normalization,
                observation_names=[str(n) for n in data["observation_names"]],
                models=[dict(m) for m in data["models"]],
                bpw_range=(low, high),
                seed=int(data["seed"]),
                timesteps=int(data["timesteps"]),
                constraints=dict(data["constraints"]),
                reward=RewardConfig.from_dict(data["reward"]),
                policy_kwargs=dict(data["policy_kwargs"]),
                action_mapping=str(data.get("action_mapping", "index")),
                zip_sha256=str(data["zip_sha256"]),
                replay_buffer_sha256=str(data.get("replay_buffer_sha256", "")),
                observation_version=str(data["observation_version"]),
                algorithm=str(data["algorithm"]),
                versions=dict(data.get("versions") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"{source}: incomplete policy sidecar ({type(exc).__name__}: {exc})") from None
        if card.observation_names != observation_names(normalization.feature_names):
            raise BitallocError(f"{source}: observation_names do not match the features of its normalization")
        if card.action_mapping not in ACTION_MAPPINGS:
            raise BitallocError(f"{source}: action_mapping {card.action_mapping!r}, this code maps {', '.join(ACTION_MAPPINGS)}")
        net_arch = card.policy_kwargs.get("net_arch")
        if not isinstance(net_arch, list) or not all(isinstance(n, int) and n > 0 for n in net_arch):
            raise BitallocError(f"{source}: policy_kwargs.net_arch must be a list of layer widths")
        return card

    def check_table(self, table: SensitivityTable) -> None:
        """Refuse a table this policy cannot observe (another feature schema or feature list)."""
        self.normalization.check(table)


def versions() -> dict[str, str]:
    import gymnasium
    import stable_baselines3
    import torch

    return {"bitalloc": __version__, "stable_baselines3": stable_baselines3.__version__, "gymnasium": gymnasium.__version__, "torch": torch.__version__}


def write_sidecar(zip_path: Path, card: PolicyCard) -> Path:
    """Write ``card`` beside ``zip_path`` (atomically)."""
    path = sidecar_path(zip_path)
    write_json(path, card.to_json())
    return path


def save_artifact(model: SAC, zip_path: Path | str, card: PolicyCard) -> Path:
    """Save ``model`` as ``zip_path`` and its sidecar (with the zip's hash) beside it."""
    zip_path = Path(zip_path)
    if zip_path.suffix != ".zip":
        raise BitallocError(f"a policy file must end in .zip, got {zip_path}")
    with atomic_path(zip_path) as tmp:
        model.save(tmp)
    write_sidecar(zip_path, replace(card, zip_sha256=file_sha256(zip_path)))
    return zip_path


def read_card(zip_path: Path | str) -> PolicyCard:
    """The checked sidecar of ``zip_path``; refuses a missing zip or sidecar and a zip whose hash
    differs from the one its sidecar recorded."""
    zip_path = Path(zip_path)
    if not zip_path.is_file():
        raise BitallocError(f"no policy at {zip_path}")
    side = sidecar_path(zip_path)
    if not side.is_file():
        raise BitallocError(f"{zip_path} has no sidecar {side.name}; refusing to load a policy without one")
    try:
        data = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BitallocError(f"cannot read policy sidecar {side}: {str(exc).splitlines()[0]}") from None
    card = PolicyCard.from_json(data, str(side))
    if card.zip_sha256 != file_sha256(zip_path):
        raise BitallocError(f"{zip_path} does not match its sidecar (sha256 differs); refusing to load it")
    return card


@dataclass
class LoadedPolicy:
    """A policy ready to act: its card and the SAC actor rebuilt from weights only."""

    path: Path
    card: PolicyCard
    policy: SACPolicy

    def check_table(self, table: SensitivityTable) -> None:
        self.card.check_table(table)

    def act(self, observation: np.ndarray) -> np.ndarray:
        """The deterministic action (the mean of the squashed Gaussian) for one observation."""
        action, _ = self.policy.predict(observation, deterministic=True)
        return np.asarray(action, dtype=np.float32)


def load_policy(zip_path: Path | str) -> LoadedPolicy:
    """Load a policy artifact for inference (see the module doc: no unpickling)."""
    import torch
    from gymnasium import spaces
    from stable_baselines3.sac.policies import SACPolicy

    zip_path = Path(zip_path)
    card = read_card(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            raw = archive.read("policy.pth")
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, KeyError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise BitallocError(f"{zip_path}: not a stable-baselines3 policy zip ({type(exc).__name__})") from None
    size = len(card.observation_names)
    observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(size,), dtype=np.float32)
    action_space = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
    policy = SACPolicy(observation_space, action_space, lambda _: 0.0, **card.policy_kwargs)
    try:
        policy.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise BitallocError(f"{zip_path}: the network does not match its sidecar ({str(exc).splitlines()[0]})") from None
    policy.set_training_mode(False)
    return LoadedPolicy(zip_path, card, policy)


def load_checkpoint(zip_path: Path, env: VecEnv | Any, replay_buffer: Path | None = None, device: str = "cpu") -> SAC:
    """Resume a training run from one of its own checkpoints: checks the sidecar and the hashes of
    the zip and the replay buffer before stable-baselines3 unpickles them."""
    from stable_baselines3 import SAC

    card = read_card(zip_path)
    if replay_buffer is not None and card.replay_buffer_sha256 != file_sha256(replay_buffer):
        raise BitallocError(f"{replay_buffer} does not match the sidecar of {zip_path.name}; refusing to load it")
    model = SAC.load(zip_path, env=env, device=device)
    if replay_buffer is not None:
        model.load_replay_buffer(replay_buffer)
    return model
