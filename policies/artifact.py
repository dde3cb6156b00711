"""The policy artifact: a stable-baselines3 SAC zip plus a JSON sidecar that says what it is.

``policy.zip`` holds what ``SAC.save`` writes (usable with stable-baselines3 directly), repacked
with fixed member timestamps and without the wall-clock fields of SB3's ``data`` entry, so that
same-seed runs write byte-identical files (:func:`write_model_zip`). ``policy.json`` beside it
(:class:`PolicyCard`) records everything needed to use the policy on a new model and to refuse it
where it does not fit:

- ``schema_version`` (:data:`ARTIFACT_SCHEMA_VERSION`), ``algorithm``, library versions;
- ``feature_schema`` and ``observation_version``: the layer-feature schema of the profiles and the
  observation layout of the environment the policy was trained on, with the observation's column
  names; a table or code with another schema is refused (one :class:`BitallocError` line);
- ``normalization``: the layer-feature normalization fitted on the training tables
  (:class:`envs.observation.FeatureNormalization`), applied unchanged to any new model;
- ``models``: per training table the model, table key, option labels and layer count;
- ``bpw_range``, ``seed``, ``timesteps``, ``constraints``, ``reward`` and ``policy_kwargs``;
- ``zip_sha256`` (and for checkpoints ``replay_buffer_sha256``): the hash of the files it describes;
- for checkpoints, ``training`` (:class:`TrainingState`): the scalar training state to resume from.

Trust: nothing read from a policy or checkpoint is ever unpickled or used as code. The hashes only
prove that a zip matches the sidecar beside it (whoever can write one can rewrite both), so they
guard against accidents, not attackers; what makes loading safe is that

- every sidecar field is type- and range-checked (:meth:`PolicyCard.from_json`): ``policy_kwargs``
  holds only ``net_arch`` (1 to :data:`MAX_LAYERS` widths of 1 to :data:`MAX_WIDTH`) and
  optionally ``activation_fn``, a name from the allow-list :data:`ACTIVATIONS`;
- networks, optimizers and replay buffers are built by this code from those checked fields and the
  run's own settings; the zip contributes only tensors, read from its ``.pth`` entries with
  ``torch.load(weights_only=True)`` and checked against what was built (:func:`load_policy`,
  :func:`restore_checkpoint`); the zip's ``data`` entry, SB3's cloudpickled attributes, is never read;
- a checkpoint's replay buffer is plain arrays (:mod:`policies.replay_buffer`), never a pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
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
from envs.observation import (
    FEATURES_OBSERVATION_VERSION,
    OBS_CLIP,
    OBSERVATION_VERSION,
    OBSERVATION_VERSIONS,
    FeatureNormalization,
    observation_names,
    observation_version,
)
from envs.reward import RewardConfig
from policies.replay_buffer import load_replay_buffer

if TYPE_CHECKING:
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.vec_env import VecEnv
    from stable_baselines3.sac.policies import SACPolicy

ARTIFACT_SCHEMA_VERSION = 1
ALGORITHM = "SAC"
SIDECAR_SUFFIX = ".json"

ACTIVATIONS: dict[str, str] = {"relu": "ReLU", "tanh": "Tanh", "elu": "ELU", "leaky_relu": "LeakyReLU", "silu": "SiLU", "gelu": "GELU"}
"""``policy_kwargs.activation_fn`` names a sidecar may use -> the ``torch.nn`` class built (SAC's default is ReLU)."""
MAX_LAYERS = 8
MAX_WIDTH = 4096
"""Bounds on ``policy_kwargs.net_arch``: a sidecar cannot make us build an arbitrarily large network."""
MAX_FEATURES = 4096
MAX_BUFFER_SIZE = 10_000_000
"""Largest replay buffer a checkpoint may ask for (2.6 GB of float32 at 32 observation columns)."""
POLICY_KWARGS = ("net_arch", "activation_fn")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
"""Timestamp of every member of the zips written here (the zip format's earliest), for byte-identical files."""
VOLATILE_DATA = ("start_time", "ep_info_buffer", "ep_success_buffer")
"""SB3 ``data`` attributes left out of the zips: wall-clock values (start time, Monitor episode times)."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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


# --- field checks: each returns the value or raises a one-line BitallocError naming the field ---


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1 here


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise BitallocError(f"{name} must be an integer {bound}, got {_short(value)}")
    return int(value)


def _number(value: Any, name: str) -> float:
    if not _is_number(value):
        raise BitallocError(f"{name} must be a finite number, got {_short(value)}")
    return float(value)


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BitallocError(f"{name} must be a string, got {_short(value)}")
    return value


def _list(value: Any, name: str, check: Callable[[Any, str], Any], max_len: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > max_len:
        raise BitallocError(f"{name} must be a list of at most {max_len} entries, got {_short(value)}")
    return [check(item, f"{name}[{i}]") for i, item in enumerate(value)]


def _object(value: Any, name: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BitallocError(f"{name} must be a JSON object, got {_short(value)}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise BitallocError(f"{name}.{unknown[0]} is not a field this code reads (known: {', '.join(known)})")
    missing = [key for key in required if key not in value]
    if missing:
        raise BitallocError(f"{name}.{missing[0]} is missing")
    return value


def _sha256(value: Any, name: str, empty: bool = False) -> str:
    if not (isinstance(value, str) and (_SHA256.match(value) or (empty and value == ""))):
        raise BitallocError(f"{name} must be a sha256 hex digest, got {_short(value)}")
    return value


def check_policy_kwargs(value: Any, name: str = "policy_kwargs") -> dict[str, Any]:
    """The sidecar's ``policy_kwargs``, checked: ``net_arch`` (1 to :data:`MAX_LAYERS` widths, each
    1 to :data:`MAX_WIDTH`) and optionally ``activation_fn`` (a name in :data:`ACTIVATIONS`)."""
    data = _object(value, name, POLICY_KWARGS, required=("net_arch",))
    net_arch = data["net_arch"]
    if not (isinstance(net_arch, list) and 1 <= len(net_arch) <= MAX_LAYERS and all(_is_int(n) and 1 <= n <= MAX_WIDTH for n in net_arch)):
        raise BitallocError(f"{name}.net_arch must be a list of 1 to {MAX_LAYERS} layer widths, each 1 to {MAX_WIDTH}; got {_short(net_arch)}")
    out: dict[str, Any] = {"net_arch": [int(n) for n in net_arch]}
    if "activation_fn" in data:
        activation = data["activation_fn"]
        if not (isinstance(activation, str) and activation in ACTIVATIONS):
            raise BitallocError(f"{name}.activation_fn {_short(activation)} is not one of {', '.join(ACTIVATIONS)}")
        out["activation_fn"] = activation
    return out


def network_kwargs(policy_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Checked ``policy_kwargs`` as SB3's ``SACPolicy`` takes them (a fresh dict: SAC adds its own keys)."""
    import torch

    checked = check_policy_kwargs(policy_kwargs)
    out: dict[str, Any] = {"net_arch": list(checked["net_arch"])}
    if "activation_fn" in checked:
        out["activation_fn"] = getattr(torch.nn, ACTIVATIONS[checked["activation_fn"]])
    return out


def _normalization(value: Any, name: str) -> FeatureNormalization:
    # typed here: FeatureNormalization.from_dict coerces with str()/float(), which would accept nonsense
    data = _object(value, name, ("feature_schema", "feature_names", "mean", "std", "clip"),
                   required=("feature_schema", "feature_names", "mean", "std"))
    _str(data["feature_schema"], f"{name}.feature_schema")
    _list(data["feature_names"], f"{name}.feature_names", _str, MAX_FEATURES)
    _list(data["mean"], f"{name}.mean", _number, MAX_FEATURES)
    std = _list(data["std"], f"{name}.std", _number, MAX_FEATURES)
    if "clip" in data and _number(data["clip"], f"{name}.clip") <= 0:
        raise BitallocError(f"{name}.clip must be positive")
    if min(std, default=1.0) <= 0:
        raise BitallocError(f"{name}.std must be positive")
    return FeatureNormalization.from_dict(data)


def _model_record(value: Any, name: str) -> dict[str, Any]:
    keys = ("model", "table_key", "option_labels", "layers")
    data = _object(value, name, keys, required=keys)
    return {
        "model": _str(data["model"], f"{name}.model"),
        "table_key": _str(data["table_key"], f"{name}.table_key"),
        "option_labels": _list(data["option_labels"], f"{name}.option_labels", _str, 1024),
        "layers": _int(data["layers"], f"{name}.layers", 1),
    }


def _bpw_limit(value: Any, name: str) -> Any:
    if value is None or _is_number(value):
        return value
    if isinstance(value, Mapping) and all(isinstance(k, str) and _is_number(v) for k, v in value.items()):
        return dict(value)
    raise BitallocError(f"{name} must be a number, an object of numbers or null, got {_short(value)}")


def _constraints(value: Any, name: str) -> dict[str, Any]:
    data = _object(value, name, ("loss", "tie", "min_bpw", "max_bpw"))
    out: dict[str, Any] = {}
    if "loss" in data:
        out["loss"] = None if data["loss"] is None else _str(data["loss"], f"{name}.loss")
    if "tie" in data:
        if not isinstance(data["tie"], bool):
            raise BitallocError(f"{name}.tie must be true or false, got {_short(data['tie'])}")
        out["tie"] = data["tie"]
    for key in ("min_bpw", "max_bpw"):
        if key in data:
            out[key] = _bpw_limit(data[key], f"{name}.{key}")
    return out


def _reward(value: Any, name: str) -> RewardConfig:
    known = tuple(RewardConfig.__dataclass_fields__)
    data = _object(value, name, known)
    for key, item in data.items():
        if key == "dense" and not isinstance(item, bool):
            raise BitallocError(f"{name}.dense must be true or false, got {_short(item)}")
        if key != "dense":
            _number(item, f"{name}.{key}")
    return RewardConfig.from_dict(data)


def _versions(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or len(value) > 64:
        raise BitallocError(f"{name} must be a JSON object of library versions, got {_short(value)}")
    return {k: _str(v, f"{name}.{k}") for k, v in value.items()}  # JSON object keys are strings


@dataclass(frozen=True)
class TrainingState:
    """The scalar training state a checkpoint's sidecar records, so that a run resumes without the
    zip's pickled ``data`` entry (where ``SAC.save`` keeps it): step and update counters, the replay
    buffer size and warm-up the run was started with, and the learned log entropy coefficient."""

    num_timesteps: int
    n_updates: int
    episode_num: int
    buffer_size: int
    learning_starts: int
    log_ent_coef: float | None
    """``None`` for a fixed entropy coefficient (not what :func:`policies.sac.train` builds)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "num_timesteps": self.num_timesteps,
            "n_updates": self.n_updates,
            "episode_num": self.episode_num,
            "buffer_size": self.buffer_size,
            "learning_starts": self.learning_starts,
            "log_ent_coef": self.log_ent_coef,
        }

    @classmethod
    def from_json(cls, value: Any, name: str = "training") -> TrainingState:
        keys = ("num_timesteps", "n_updates", "episode_num", "buffer_size", "learning_starts", "log_ent_coef")
        data = _object(value, name, keys, required=keys)
        log_ent_coef = data["log_ent_coef"]
        return cls(
            num_timesteps=_int(data["num_timesteps"], f"{name}.num_timesteps", 0),
            n_updates=_int(data["n_updates"], f"{name}.n_updates", 0),
            episode_num=_int(data["episode_num"], f"{name}.episode_num", 0),
            buffer_size=_int(data["buffer_size"], f"{name}.buffer_size", 1, MAX_BUFFER_SIZE),
            learning_starts=_int(data["learning_starts"], f"{name}.learning_starts", 0),
            log_ent_coef=None if log_ent_coef is None else _number(log_ent_coef, f"{name}.log_ent_coef"),
        )

    @classmethod
    def of(cls, model: SAC) -> TrainingState:
        """The state of ``model`` now (a float32 log entropy coefficient round-trips exactly through JSON)."""
        coef = model.log_ent_coef
        return cls(int(model.num_timesteps), int(model._n_updates), int(model._episode_num), int(model.buffer_size),
                   int(model.learning_starts), None if coef is None else float(coef.detach().cpu().item()))


_CARD_FIELDS = ("schema_version", "algorithm", "feature_schema", "observation_version", "observation_names", "normalization", "models",
                "bpw_range", "seed", "timesteps", "constraints", "reward", "policy_kwargs", "action_mapping", "zip_sha256",
                "replay_buffer_sha256", "versions", "training")
_CARD_REQUIRED = ("schema_version", "algorithm", "feature_schema", "observation_version", "observation_names", "normalization", "models",
                  "bpw_range", "seed", "timesteps", "constraints", "reward", "policy_kwargs", "zip_sha256")


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
    training: TrainingState | None = None
    """Checkpoints only: the state to resume from (sidecars without it cannot be resumed from)."""

    @property
    def feature_schema(self) -> str:
        return self.normalization.feature_schema

    def to_json(self) -> dict[str, Any]:
        out = {
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
        if self.training is not None:  # policy sidecars keep the format they always had
            out["training"] = self.training.to_json()
        return out

    def run_fields(self) -> dict[str, Any]:
        """What every sidecar of one training run shares (all but counters, hashes and versions)."""
        data = self.to_json()
        for key in ("timesteps", "zip_sha256", "replay_buffer_sha256", "versions", "training"):
            data.pop(key, None)
        return data

    @classmethod
    def from_json(cls, data: Any, source: str) -> PolicyCard:
        """Parse and check every field of a sidecar (types, ranges, allow-lists); any problem is a
        one-line :class:`BitallocError` that starts with ``source``."""
        try:
            return cls._parse(data)
        except BitallocError as exc:
            raise BitallocError(f"{source}: {exc}") from None

    @classmethod
    def _parse(cls, data: Any) -> PolicyCard:
        if not isinstance(data, Mapping):
            raise BitallocError("expected a JSON object")
        version = data.get("schema_version")
        if not _is_int(version) or version != ARTIFACT_SCHEMA_VERSION:
            raise BitallocError(f"policy sidecar schema {_short(version)}, this code reads {ARTIFACT_SCHEMA_VERSION}")
        if data.get("algorithm") != ALGORITHM:
            raise BitallocError(f"algorithm {_short(data.get('algorithm'))}, this code runs {ALGORITHM}")
        observed = data.get("observation_version")
        if observed not in OBSERVATION_VERSIONS:
            raise BitallocError(f"the policy observes {_short(observed)}, this code builds {' or '.join(map(repr, OBSERVATION_VERSIONS))}; "
                                "train it again")
        missing = [key for key in _CARD_REQUIRED if key not in data]
        if missing:
            raise BitallocError(f"incomplete policy sidecar (no {missing[0]!r})")
        _object(data, "sidecar", _CARD_FIELDS)
        normalization = _normalization(data["normalization"], "normalization")
        if data["feature_schema"] != normalization.feature_schema:
            raise BitallocError(f"feature_schema {_short(data['feature_schema'])} disagrees with its normalization")
        names = _list(data["observation_names"], "observation_names", _str, MAX_FEATURES + 64)
        if names != observation_names(normalization.feature_names):
            raise BitallocError("observation_names do not match the features of its normalization")
        bpw = data["bpw_range"]
        if not (isinstance(bpw, list) and len(bpw) == 2 and all(_is_number(b) for b in bpw) and 0 < bpw[0] <= bpw[1]):
            raise BitallocError(f"bpw_range must be [low, high] with 0 < low <= high, got {_short(bpw)}")
        action_mapping = data.get("action_mapping", "index")
        if not (isinstance(action_mapping, str) and action_mapping in ACTION_MAPPINGS):
            raise BitallocError(f"action_mapping {_short(action_mapping)}, this code maps {', '.join(ACTION_MAPPINGS)}")
        training = data.get("training")
        return cls(
            normalization=normalization,
            observation_names=names,
            models=_list(data["models"], "models", _model_record, 1024),
            bpw_range=(float(bpw[0]), float(bpw[1])),
            seed=_int(data["seed"], "seed", 0, 2**32 - 1),  # what SB3 (numpy) can seed with
            timesteps=_int(data["timesteps"], "timesteps", 0),
            constraints=_constraints(data["constraints"], "constraints"),
            reward=_reward(data["reward"], "reward"),
            policy_kwargs=check_policy_kwargs(data["policy_kwargs"]),
            action_mapping=action_mapping,
            zip_sha256=_sha256(data["zip_sha256"], "zip_sha256"),
            replay_buffer_sha256=_sha256(data.get("replay_buffer_sha256", ""), "replay_buffer_sha256", empty=True),
            observation_version=str(observed),
            algorithm=ALGORITHM,
            versions=_versions(data.get("versions"), "versions"),
            training=None if training is None else TrainingState.from_json(training),
        )

    @property
    def features_only(self) -> bool:
        """Whether the policy observes a features table (the features pass) rather than a measured profile."""
        return self.observation_version == FEATURES_OBSERVATION_VERSION

    def check_table(self, table: SensitivityTable) -> None:
        """Refuse a table this policy cannot observe (another feature schema or feature list, or the other kind of
        table: a features-only policy observes features tables only, a table policy measured profiles only)."""
        self.normalization.check(table)
        if observation_version(table) != self.observation_version:
            wanted = "a features table (bitalloc features)" if self.features_only else "a measured profile (bitalloc profile)"
            raise BitallocError(f"the policy observes {self.observation_version!r}: it needs {wanted} of {table.key.model}")


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


def write_model_zip(model: SAC, zip_path: Path) -> Path:
    """Write ``model`` as ``SAC.save`` would, atomically and byte-for-byte reproducibly.

    SB3 stamps some members with the current time and keeps wall-clock values (its start time,
    the Monitor's episode times) in ``data``; here those values are left out (:data:`VOLATILE_DATA`:
    SB3 rebuilds them, and we never read ``data``) and every member is stamped :data:`ZIP_DATE`.
    The members, their order and contents are otherwise SB3's, so ``SAC.load`` still reads the file.
    """
    raw = io.BytesIO()
    model.save(raw, exclude=list(VOLATILE_DATA))
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as source, atomic_path(Path(zip_path)) as tmp, \
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=ZIP_DATE)
            entry.external_attr = 0o644 << 16
            target.writestr(entry, source.read(info))
    return Path(zip_path)


def save_artifact(model: SAC, zip_path: Path | str, card: PolicyCard) -> Path:
    """Save ``model`` as ``zip_path`` and its sidecar (with the zip's hash) beside it."""
    zip_path = Path(zip_path)
    if zip_path.suffix != ".zip":
        raise BitallocError(f"a policy file must end in .zip, got {zip_path}")
    write_model_zip(model, zip_path)
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BitallocError(f"cannot read policy sidecar {side}: {(str(exc).splitlines() or [''])[0]}") from None
    card = PolicyCard.from_json(data, str(side))
    if card.zip_sha256 != file_sha256(zip_path):
        raise BitallocError(f"{zip_path} does not match its sidecar (sha256 differs); refusing to load it")
    return card


def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.state_dict().values())


def read_state_dicts(zip_path: Path, names: list[str], max_bytes: int, device: Any = "cpu") -> dict[str, Any]:
    """The ``<name>.pth`` members of an SB3 zip, each through ``torch.load(weights_only=True)``
    (tensors and plain containers only: no code runs), none larger than ``max_bytes`` (the size of
    what they must fill, so a crafted member cannot make us read gigabytes)."""
    import torch

    out: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for name in names:
                info = archive.getinfo(f"{name}.pth")
                if info.file_size > max_bytes:
                    raise BitallocError(f"{zip_path}: {info.filename} is {info.file_size} bytes, more than its network needs ({max_bytes})")
                out[name] = torch.load(io.BytesIO(archive.read(info)), map_location=device, weights_only=True)
    except BitallocError:
        raise
    except KeyError as exc:
        raise BitallocError(f"{zip_path}: not a stable-baselines3 SAC zip (no {exc.args[0] if exc.args else 'member'})") from None
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, pickle.UnpicklingError) as exc:
        # weights_only refusals are UnpicklingErrors with a long explanation: keep the first line
        first = (str(exc).splitlines() or [""])[0][:160]
        raise BitallocError(f"{zip_path}: not a stable-baselines3 SAC zip of tensors ({type(exc).__name__}: {first})") from None
    return out


def _load_module(module: torch.nn.Module, state: Any, what: str) -> None:
    import torch

    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise BitallocError(f"{what} is not a state dict of tensors")
    try:
        module.load_state_dict(state, strict=True)  # checks every name and shape against the network built
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BitallocError(f"{what} does not match the network its sidecar describes ({(str(exc).splitlines() or [''])[0][:160]})") from None


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Any, what: str) -> None:
    """Load an optimizer state dict after checking its structure against ``optimizer`` (torch's own
    load checks only the group sizes): the same parameter indices, and per parameter only tensors
    of that parameter's shape or single values (Adam's ``step``)."""
    import torch

    own = optimizer.state_dict()["param_groups"]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bad = BitallocError(f"{what} is not an optimizer state for the network its sidecar describes")
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise bad
    groups, entries = state["param_groups"], state["state"]
    if not isinstance(groups, list) or len(groups) != len(own) or not isinstance(entries, dict):
        raise bad
    for saved, mine in zip(groups, own):
        if not isinstance(saved, dict) or saved.get("params") != mine["params"]:
            raise bad
        for key, value in saved.items():  # hyperparameters (lr, betas, ...): plain values only
            if key != "params" and not (value is None or isinstance(value, (bool, int, float, str)) or
                                        (isinstance(value, (tuple, list)) and all(_is_number(v) for v in value))):
                raise bad
    for index, entry in entries.items():
        if not (_is_int(index) and 0 <= index < len(params)) or not isinstance(entry, dict):
            raise bad
        for value in entry.values():
            if not isinstance(value, torch.Tensor) or (value.numel() != 1 and value.shape != params[index].shape):
                raise bad
    try:
        optimizer.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError):
        raise bad from None


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
    """Load a policy artifact for inference (see the module doc: no unpickling): the network is
    built from the checked sidecar, then filled from the zip's ``policy.pth``."""
    from gymnasium import spaces
    from stable_baselines3.sac.policies import SACPolicy

    zip_path = Path(zip_path)
    card = read_card(zip_path)
    size = len(card.observation_names)
    observation_space = spaces.Box(-OBS_CLIP, OBS_CLIP, shape=(size,), dtype=np.float32)
    action_space = spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
    policy = SACPolicy(observation_space, action_space, lambda _: 0.0, **network_kwargs(card.policy_kwargs))
    state = read_state_dicts(zip_path, ["policy"], 2 * _tensor_bytes(policy) + (1 << 20))["policy"]
    _load_module(policy, state, f"{zip_path}: policy.pth")
    policy.set_training_mode(False)
    return LoadedPolicy(zip_path, card, policy)


def training_state(card: PolicyCard, zip_path: Path) -> TrainingState:
    """A checkpoint's training state; a sidecar without one (written before checkpoints stopped
    being pickles) is refused: resuming from it would need ``SAC.load``."""
    if card.training is None:
        raise BitallocError(f"{zip_path}: a checkpoint without training state (an older version's); it is never resumed from")
    if card.training.num_timesteps != card.timesteps:
        raise BitallocError(f"{zip_path}: training.num_timesteps {card.training.num_timesteps} differs from timesteps {card.timesteps}")
    return card.training


def restore_checkpoint(model: SAC, zip_path: Path, replay_buffer: Path | None = None, card: PolicyCard | None = None) -> SAC:
    """Load a checkpoint into ``model``, which trusted code built with the checkpoint's settings
    (:func:`load_checkpoint`): network and optimizer states from the zip's ``.pth`` members
    (:func:`read_state_dicts`), counters and the entropy coefficient from the checked sidecar, and
    the replay buffer from its arrays (:func:`policies.replay_buffer.load_replay_buffer`)."""
    zip_path = Path(zip_path)
    card = card or read_card(zip_path)
    state = training_state(card, zip_path)
    if replay_buffer is not None and card.replay_buffer_sha256 != file_sha256(replay_buffer):
        raise BitallocError(f"{replay_buffer} does not match the sidecar of {zip_path.name}; refusing to load it")
    if state.buffer_size != model.buffer_size or (state.log_ent_coef is None) != (model.log_ent_coef is None):
        raise BitallocError(f"{zip_path}: its training state does not fit the model built for it")
    optimizers = {"actor.optimizer": model.actor.optimizer, "critic.optimizer": model.critic.optimizer}
    if model.ent_coef_optimizer is not None:
        optimizers["ent_coef_optimizer"] = model.ent_coef_optimizer
    # Adam keeps two tensors per parameter: no member needs more than 3x the network's size
    states = read_state_dicts(zip_path, ["policy", *optimizers], 3 * _tensor_bytes(model.policy) + (1 << 20), model.device)
    _load_module(model.policy, states["policy"], f"{zip_path}: policy.pth")
    for name, optimizer in optimizers.items():
        _load_optimizer(optimizer, states[name], f"{zip_path}: {name}.pth")
    if model.log_ent_coef is not None and state.log_ent_coef is not None:  # both or neither (checked above)
        model.log_ent_coef.data.fill_(state.log_ent_coef)  # .data: the optimizer holds this very tensor
    model.num_timesteps = state.num_timesteps
    model._n_updates = state.n_updates
    model._episode_num = state.episode_num
    if replay_buffer is not None:
        assert model.replay_buffer is not None  # SAC builds it with the model
        load_replay_buffer(model.replay_buffer, Path(replay_buffer))
    return model


def load_checkpoint(zip_path: Path, env: VecEnv | Any, replay_buffer: Path | None = None, device: str = "cpu", **settings: Any) -> SAC:
    """A training checkpoint as a SAC model, without unpickling anything.

    The model is built by this code from the checkpoint's checked sidecar (network, seed, buffer
    size and warm-up) and ``settings`` (further SAC hyperparameters from trusted code: the run's
    learning rate, batch size, gamma), then :func:`restore_checkpoint` fills it. Without
    ``replay_buffer`` the model is one to act with or score: only its network is loaded (so older
    versions' checkpoints, without training state, still serve), with an empty one-slot buffer.
    """
    from stable_baselines3 import SAC

    zip_path = Path(zip_path)
    card = read_card(zip_path)
    if replay_buffer is not None:
        state = training_state(card, zip_path)
        model = SAC("MlpPolicy", env, policy_kwargs=network_kwargs(card.policy_kwargs), seed=card.seed, device=device,
                    buffer_size=state.buffer_size, learning_starts=state.learning_starts, **settings)
        return restore_checkpoint(model, zip_path, replay_buffer, card)
    model = SAC("MlpPolicy", env, policy_kwargs=network_kwargs(card.policy_kwargs), seed=card.seed, device=device, buffer_size=1, **settings)
    weights = read_state_dicts(zip_path, ["policy"], 2 * _tensor_bytes(model.policy) + (1 << 20), model.device)["policy"]
    _load_module(model.policy, weights, f"{zip_path}: policy.pth")
    model.num_timesteps = card.timesteps
    return model
