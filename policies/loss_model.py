"""A loss model: a new model's single-layer KL, predicted from what its features pass knows (issue 23's lever).

RAMP's zero-shot setting forbids measuring the new model's sensitivities. What a measured profile mostly tells the
ILP is each layer's *level* (how much KL the layer makes at all); the options' costs relative to each other within a
layer are much alike across layers and models (results/loss_model_transfer.md: with the true levels and option
offsets taken from another model the ILP lands within -11% to +16% of the measured-KL ILP). So the model is

    log kl[l, o]  ≈  level(x_l) + offset[o],

``offset[o]`` the mean over the training layers of ``log kl[l, o] − log kl[l, anchor]`` and ``level`` a ridge regression
of ``log kl[l, anchor]`` on the layer's inputs ``x_l``: its features (:mod:`allocator.measure.features`) and, where the
features table carries the loss ``fisher_twin`` (``½ Σ F ⊙ (W − Q)²`` of each option's calibration-free twin, F the
diagonal Fisher: a gradient pass, no quantized forward), the log of that loss at the anchor option, centered within
the model. Inputs are standardized on the training layers; which inputs (every feature, or only the module kind and
depth, or only the kind: :data:`INPUT_SETS`, each with the Fisher input where there is one) and the ridge weight are
chosen together by cross-validation that holds out one training model at a time (several models: the zero-shot
setting), or whole decoder blocks (one model); fewer inputs transfer better between models where the Fisher input
carries the level (results/loss_model_transfer.md). Fitted on measured tables (their ``kl``) with the features tables of the same models;
:func:`with_learned_loss` adds its prediction to a new model's features table as the loss :data:`LEARNED_LOSS`,
which the solvers (and a policy trained on it) use like any other loss.

Stored as JSON (:meth:`LossModel.save`), every field type- and shape-checked on load (:meth:`LossModel.from_dict`);
nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allocator.errors import BitallocError
from allocator.measure.features import ACTIVATION_FEATURES, MODULE_KINDS
from allocator.measure.features_pass import twins_needing_hessian
from allocator.storage import read_json, write_json
from allocator.table.losses import FISHER_TWIN, KL
from allocator.table.sensitivity import FEATURES_PASS_KEY, Option, SensitivityTable

LOSS_MODEL_VERSION = "bitalloc-loss-model-v1"
LEARNED_LOSS = "learned_kl"
"""The loss :func:`with_learned_loss` adds: predicted single-layer KL."""
FISHER_TWIN_LOSS = FISHER_TWIN
"""The features-table loss the Fisher input is read from (at the anchor option)."""
FISHER_INPUT = "log_fisher_anchor_error"
DEFAULT_ANCHOR = "gptq-w3g128-act-mse"
RIDGE_WEIGHTS = (0.1, 1.0, 10.0, 100.0, 1000.0)
INPUT_SETS: Mapping[str, tuple[str, ...] | None] = {
    "every feature": None,
    "kind + depth": (*(f"kind_{kind}" for kind in MODULE_KINDS), "relative_depth"),
    "kind": tuple(f"kind_{kind}" for kind in MODULE_KINDS),
}
"""The level's candidate inputs (None: every feature of the table), each with :data:`FISHER_INPUT` added when the loss
model reads it; :func:`fit_loss_model` keeps the set and ridge weight of least held-out error."""
CV_FOLDS = 5
_LOG_FLOOR = 1e-8
_BLOCK = re.compile(r"\.(\d+)\.")


def block_index(names: Sequence[str]) -> np.ndarray:
    """Each layer's decoder block (the first ``.N.`` of its name; layers without one share block 0)."""
    return np.array([int(m.group(1)) if (m := _BLOCK.search(name)) else 0 for name in names], dtype=np.int64)


def _log_fisher(table: SensitivityTable, anchor: str) -> np.ndarray:
    if FISHER_TWIN_LOSS not in table.losses:
        raise BitallocError(f"the table of {table.key.model} has no {FISHER_TWIN_LOSS!r} loss, which this loss model reads "
                            "(make the features table with the Fisher input)")
    logged = np.log(np.maximum(np.asarray(table.losses[FISHER_TWIN_LOSS][:, table.option_index(anchor)], dtype=np.float64), 1e-30))
    if not np.all(np.isfinite(logged)):
        raise BitallocError(f"the table of {table.key.model} lacks the anchor's {FISHER_TWIN_LOSS!r} for some layers")
    return logged - logged.mean()


def level_inputs(table: SensitivityTable, inputs: Sequence[str], anchor: str) -> np.ndarray:
    """L x K inputs of the level regression, in the order of ``inputs`` (feature names, and :data:`FISHER_INPUT`)."""
    columns = []
    for name in inputs:
        if name == FISHER_INPUT:
            columns.append(_log_fisher(table, anchor))
        elif name in table.feature_names:
            column = np.asarray(table.features[:, table.feature_names.index(name)], dtype=np.float64)
            if np.isnan(column).all():
                raise BitallocError(f"the features table of {table.key.model} lacks {name!r}, which this loss model reads "
                                    "(make it with activation statistics)")
            columns.append(np.nan_to_num(column))
        else:
            raise BitallocError(f"the table of {table.key.model} has no feature {name!r}, which this loss model reads")
    return np.stack(columns, axis=1)


def anchor_level(measured: SensitivityTable, anchor: str, loss: str = KL) -> np.ndarray:
    """``log kl[l, anchor]`` of a measured table (the regression's target)."""
    return np.log(np.maximum(np.asarray(measured.loss(loss)[:, measured.option_index(anchor)], dtype=np.float64), _LOG_FLOOR))


def additive_loss(table: SensitivityTable, level: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``exp(level[l] + offset[o])`` over ``table``'s layers and options, NaN where an option does not apply."""
    return np.where(table.bits >= 0, np.exp(level[:, None] + offsets[None, :]), np.nan)


def option_offsets(measured: SensitivityTable, anchor: str, loss: str = KL) -> np.ndarray:
    """Per option, the mean over layers of ``log kl[l, o] − log kl[l, anchor]`` (NaN where no layer has the option)."""
    logged = np.log(np.maximum(np.asarray(measured.loss(loss), dtype=np.float64), _LOG_FLOOR))
    with np.errstate(invalid="ignore"):
        difference = logged - logged[:, [measured.option_index(anchor)]]
    counts = np.isfinite(difference).sum(axis=0)
    sums = np.where(np.isfinite(difference), difference, 0.0).sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@dataclass(frozen=True)
class Ridge:
    """``((x - mean) / scale) @ coef + intercept``, fitted by ridge regression on standardized inputs."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, inputs: np.ndarray, target: np.ndarray, weight: float) -> Ridge:
        mean, scale = inputs.mean(axis=0), inputs.std(axis=0)
        scale = np.where(scale > 1e-9, scale, 1.0)
        z = (inputs - mean) / scale
        coef = np.linalg.solve(z.T @ z + weight * np.eye(z.shape[1]), z.T @ (target - target.mean()))
        return cls(mean, scale, coef, float(target.mean()))

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return np.asarray(((inputs - self.mean) / self.scale) @ self.coef + self.intercept, dtype=np.float64)


def held_out_errors(inputs: np.ndarray, target: np.ndarray, groups: np.ndarray, weights: Sequence[float] = RIDGE_WEIGHTS,
                    folds: int = CV_FOLDS, centered: bool = False) -> dict[float, float]:
    """Mean squared error of each ridge weight when the layers of one fold of ``groups`` (blocks, or whole models) are
    held out in turn; ``centered`` takes each held-out fold's mean error out first (a whole model's overall level does
    not change its allocation)."""
    fold_of = np.unique(groups, return_inverse=True)[1] % folds
    if len(np.unique(fold_of)) < 2:
        raise BitallocError("fitting a loss model needs layers from at least two decoder blocks")
    errors = {}
    for weight in weights:
        residual = np.zeros_like(target)
        for fold in np.unique(fold_of):
            held = fold_of == fold
            residual[held] = target[held] - Ridge.fit(inputs[~held], target[~held], weight).predict(inputs[held])
            if centered:
                residual[held] -= residual[held].mean()
        errors[float(weight)] = float(np.mean(residual**2))
    return errors


@dataclass(frozen=True)
class LossModel:
    """A fitted loss model (module doc): the level's ridge regression and the per-option offsets."""

    feature_schema: str
    inputs: tuple[str, ...]
    anchor: str
    offsets: Mapping[str, float]
    """Option label -> offset of its log KL from the anchor's (labels the training tables shared)."""
    ridge: Ridge
    ridge_weight: float
    trained_on: tuple[str, ...]
    cv_errors: Mapping[str, float] = dataclasses.field(default_factory=dict)
    fisher_windows: int = 0
    fisher_seqlen: int = 0
    """The features pass's Fisher input the model was fitted on (windows x tokens; 0 without one): a new model's
    features table is made with the same (:func:`allocator.measure.features_pass.features_table`)."""
    options: tuple[Option, ...] = ()
    """The training tables' options (labels and quantizer settings): what a new model's features pass prices."""

    @property
    def uses_fisher(self) -> bool:
        return FISHER_INPUT in self.inputs

    @property
    def needs_activation_statistics(self) -> bool:
        """Whether a new model's features pass needs its calibration forward for this model's inputs (without it: the
        weights and the Fisher pass alone, :func:`allocator.measure.features_pass.features_table`)."""
        return any(name in ACTIVATION_FEATURES for name in self.inputs) or bool(twins_needing_hessian(self.options))

    def check(self, table: SensitivityTable) -> None:
        """Raise a one-line :class:`BitallocError` unless ``table`` has this model's feature schema and every option priced."""
        if table.feature_schema != self.feature_schema:
            raise BitallocError(f"feature schema mismatch: the loss model was fitted on {self.feature_schema!r}, "
                                f"the table of {table.key.model} has {table.feature_schema!r}")
        unknown = [label for label in table.labels if label not in self.offsets or not math.isfinite(self.offsets[label])]
        if unknown:
            raise BitallocError(f"the loss model has no offset for option {unknown[0]!r} of {table.key.model} (it knows "
                                f"{', '.join(label for label, v in self.offsets.items() if math.isfinite(v))})")

    def predict(self, table: SensitivityTable) -> np.ndarray:
        """The L x O predicted single-layer KL of ``table``'s layers (NaN where an option does not apply)."""
        self.check(table)
        level = self.ridge.predict(level_inputs(table, self.inputs, self.anchor))
        return additive_loss(table, level, np.array([self.offsets[label] for label in table.labels]))

    def as_dict(self) -> dict[str, Any]:
        return {"version": LOSS_MODEL_VERSION, "feature_schema": self.feature_schema, "inputs": list(self.inputs),
                "anchor": self.anchor, "offsets": {k: float(v) if math.isfinite(v) else None for k, v in self.offsets.items()},
                "mean": self.ridge.mean.tolist(), "scale": self.ridge.scale.tolist(), "coef": self.ridge.coef.tolist(),
                "intercept": self.ridge.intercept, "ridge_weight": self.ridge_weight, "trained_on": list(self.trained_on),
                "cv_errors": dict(self.cv_errors), "fisher_windows": self.fisher_windows, "fisher_seqlen": self.fisher_seqlen,
                "options": [option.as_dict() for option in self.options]}

    @classmethod
    def from_dict(cls, data: Any) -> LossModel:
        """A loss model from its JSON value; anything malformed is a one-line :class:`BitallocError`."""
        if not isinstance(data, Mapping) or data.get("version") != LOSS_MODEL_VERSION:
            raise BitallocError(f"not a loss model of version {LOSS_MODEL_VERSION!r}")
        try:
            inputs = tuple(_strings(data["inputs"], "inputs"))
            vectors = [_floats(data[key], key, len(inputs)) for key in ("mean", "scale", "coef")]
            offsets = data["offsets"]
            if not isinstance(offsets, Mapping) or not offsets:
                raise BitallocError("bad loss model: offsets must map option labels to numbers")
            model = cls(
                feature_schema=_string(data["feature_schema"], "feature_schema"),
                inputs=inputs,
                anchor=_string(data["anchor"], "anchor"),
                offsets={_string(k, "offset label"): math.nan if v is None else _float(v, "offset") for k, v in offsets.items()},
                ridge=Ridge(vectors[0], vectors[1], vectors[2], _float(data["intercept"], "intercept")),
                ridge_weight=_float(data["ridge_weight"], "ridge_weight"),
                trained_on=tuple(_strings(data["trained_on"], "trained_on")),
                cv_errors={_string(k, "cv label"): _float(v, "cv error") for k, v in dict(data.get("cv_errors", {})).items()},
                fisher_windows=_count(data.get("fisher_windows", 0), "fisher_windows"),
                fisher_seqlen=_count(data.get("fisher_seqlen", 0), "fisher_seqlen"),
                options=tuple(_option(v) for v in _list(data.get("options", []), "options")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"bad loss model: {type(exc).__name__} {exc}") from None
        if not inputs or min(model.ridge.scale) <= 0 or model.anchor not in model.offsets:
            raise BitallocError("bad loss model: it needs inputs, positive scales and an offset for its anchor")
        if sorted(o.label for o in model.options) != sorted(model.offsets):
            raise BitallocError("bad loss model: its options and its offsets must name the same labels")
        if model.uses_fisher != (model.fisher_windows > 0 and model.fisher_seqlen > 1):
            raise BitallocError("bad loss model: a Fisher input needs its windows and tokens (and only a Fisher input has them)")
        return model

    def save(self, path: Path | str) -> Path:
        write_json(Path(path), self.as_dict())
        return Path(path)

    @classmethod
    def load(cls, path: Path | str) -> LossModel:
        return cls.from_dict(read_json(Path(path), "loss model"))


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise BitallocError(f"bad loss model: {name} must be a non-empty string")
    return value


def _strings(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or len(value) > 1000:
        raise BitallocError(f"bad loss model: {name} must be a list of strings")
    return [_string(v, name) for v in value]


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BitallocError(f"bad loss model: {name} must be a finite number")
    return float(value)


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > 1000:
        raise BitallocError(f"bad loss model: {name} must be a list")
    return value


def _option(value: Any) -> Option:
    if not isinstance(value, Mapping) or not isinstance(value.get("settings", {}), Mapping):
        raise BitallocError("bad loss model: an option is a label with its settings")
    settings = value.get("settings", {})
    if not all(isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in settings.items()):
        raise BitallocError("bad loss model: option settings hold only names, numbers, booleans and null")
    return Option(_string(value.get("label"), "option label"), dict(settings))


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise BitallocError(f"bad loss model: {name} must be a whole number from 0")
    return value


def _floats(value: Any, name: str, length: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) != length:
        raise BitallocError(f"bad loss model: {name} must list {length} numbers, one per input")
    return np.array([_float(v, name) for v in value], dtype=np.float64)


def fit_loss_model(
    pairs: Sequence[tuple[SensitivityTable, SensitivityTable]],
    use_fisher: bool = True,
    anchor: str = DEFAULT_ANCHOR,
    loss: str = KL,
    weights: Sequence[float] = RIDGE_WEIGHTS,
    fisher_pass: tuple[int, int] | None = None,
    input_sets: Mapping[str, tuple[str, ...] | None] | None = None,
) -> LossModel:
    """Fit a loss model on ``pairs`` of (measured table, features table) of the same models: the level's target is each
    measured table's ``loss`` at ``anchor``, centered per model (a new model's overall level does not matter to its
    allocation, only the levels' differences between its layers); the offsets are averaged over all layers; the level's
    inputs are the set of ``input_sets`` (default :data:`INPUT_SETS`) and the ridge weight of ``weights`` with the least
    held-out error: one training model held out at a time where there are several (the zero-shot setting; each model's
    overall level taken out), else its decoder blocks. With
    ``use_fisher`` the Fisher input's windows and tokens are read from the features tables' pass (or ``fisher_pass``,
    for tables that were given the loss another way), and must agree."""
    if not pairs:
        raise BitallocError("fitting a loss model needs at least one (measured, features) pair of tables")
    first_features = pairs[0][1]
    if use_fisher and fisher_pass is None:
        passes = {_fisher_pass(features) for _, features in pairs}
        if len(passes) != 1 or None in passes:
            raise BitallocError("the features tables of a loss model with a Fisher input must all come from one Fisher pass setting")
        fisher_pass = passes.pop()
    candidates = candidate_inputs(first_features.feature_names, use_fisher, INPUT_SETS if input_sets is None else input_sets)
    every = tuple(dict.fromkeys(name for names in candidates.values() for name in names))
    rows, targets, groups, model_of, offsets, levels = [], [], [], [], [], []
    for index, (measured, features) in enumerate(pairs):
        if measured.names != features.names or measured.labels != features.labels:
            raise BitallocError(f"the measured and features tables of {measured.key.model} must list the same layers and options")
        if features.feature_schema != first_features.feature_schema or features.feature_names != first_features.feature_names:
            raise BitallocError("the features tables of a loss model must share their feature schema")
        level = anchor_level(measured, anchor, loss)
        levels.append(level)
        rows.append(level_inputs(features, every, anchor))
        targets.append(level - level.mean())
        groups.append(index * 100_000 + block_index(features.names))
        model_of.append(np.full(len(features.names), index))
        offsets.append(option_offsets(measured, anchor, loss))
    labels = pairs[0][0].labels
    if any(m.labels != labels for m, _ in pairs):
        raise BitallocError("the tables of a loss model must share their options")
    x_every, y, g = np.concatenate(rows), np.concatenate(targets), np.concatenate(groups)
    # several training models: hold out one model at a time (what a new model is); one: hold out its blocks
    several = len(pairs) > 1
    held_groups, folds = (np.concatenate(model_of), len(pairs)) if several else (g, CV_FOLDS)
    errors: dict[tuple[str, float], float] = {}
    for set_name, names in candidates.items():
        columns = [every.index(name) for name in names]
        held = held_out_errors(x_every[:, columns], y, held_groups, weights, folds=folds, centered=several)
        errors.update({(set_name, w): e for w, e in held.items()})
    set_name, weight = min(errors, key=errors.__getitem__)
    inputs = candidates[set_name]
    x = x_every[:, [every.index(name) for name in inputs]]
    stacked = np.stack(offsets)
    counts = np.isfinite(stacked).sum(axis=0)
    mean_offsets = np.where(counts > 0, np.where(np.isfinite(stacked), stacked, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan)
    return LossModel(
        feature_schema=first_features.feature_schema,
        inputs=tuple(inputs),
        anchor=anchor,
        offsets=dict(zip(labels, map(float, mean_offsets), strict=True)),
        # slopes fitted within models; the intercept puts predictions at the training models' mean level, so the loss
        # reads as KL (an overall level shift does not change an allocation)
        ridge=dataclasses.replace(Ridge.fit(x, y, weight), intercept=float(np.mean([level.mean() for level in levels]))),
        ridge_weight=weight,
        trained_on=tuple(m.key.model for m, _ in pairs),
        cv_errors={f"{name}, {w:g}": e for (name, w), e in errors.items()},
        fisher_windows=fisher_pass[0] if use_fisher and fisher_pass else 0,
        fisher_seqlen=fisher_pass[1] if use_fisher and fisher_pass else 0,
        options=tuple(pairs[0][0].options),
    )


def candidate_inputs(feature_names: Sequence[str], use_fisher: bool, input_sets: Mapping[str, tuple[str, ...] | None]) -> dict[str, tuple[str, ...]]:
    """Each candidate set's inputs: its features the table has (None: all of them), then the Fisher input if used; a set
    left empty, or equal to an earlier one, is dropped."""
    out: dict[str, tuple[str, ...]] = {}
    for name, wanted in input_sets.items():
        names = (*(n for n in feature_names if wanted is None or n in wanted), *((FISHER_INPUT,) if use_fisher else ()))
        if names and names not in out.values():
            out[name] = names
    if not out:
        raise BitallocError("none of the loss model's candidate input sets has an input in these tables")
    return out


def _fisher_pass(features: SensitivityTable) -> tuple[int, int] | None:
    fisher = features.metadata.get(FEATURES_PASS_KEY, {}).get("fisher")
    return (int(fisher["windows"]), int(fisher["seqlen"])) if isinstance(fisher, Mapping) else None


def load_loss_model(path_or_name: str | Path) -> LossModel:
    """A loss model from a .json path, or the name of one shipped in :mod:`policies.pretrained` (``<name>.json``)."""
    import policies.pretrained as pretrained

    path = Path(path_or_name)
    if path.suffix == ".json" or path.exists():
        return LossModel.load(path)
    name = str(path_or_name)
    shipped = Path(pretrained.PRETRAINED_DIR) / f"{name}.json"
    if Path(name).name != name or not shipped.is_file():
        raise BitallocError(f"no loss model at {name!r} (a .json file, or a shipped name: "
                            f"{', '.join(shipped_loss_models()) or 'none shipped'})")
    return LossModel.load(shipped)


def shipped_loss_models() -> list[str]:
    """Names of the loss models in :mod:`policies.pretrained`."""
    import policies.pretrained as pretrained

    names = []
    for path in sorted(Path(pretrained.PRETRAINED_DIR).glob("*.json")):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("version") == LOSS_MODEL_VERSION:
                names.append(path.stem)
        except (OSError, ValueError, AttributeError):
            continue
    return names


def with_learned_loss(table: SensitivityTable, model: LossModel) -> SensitivityTable:
    """``table`` with :data:`LEARNED_LOSS` (the model's prediction) as its first (default) loss."""
    return dataclasses.replace(table, losses={LEARNED_LOSS: model.predict(table), **table.losses})


__all__ = ["FISHER_INPUT", "FISHER_TWIN_LOSS", "LEARNED_LOSS", "LossModel", "Ridge", "fit_loss_model", "load_loss_model", "shipped_loss_models",
           "with_learned_loss"]
