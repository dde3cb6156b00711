"""The sensitivity table: per layer and per candidate option, exact storage bits and loss estimates.

One table is produced by profiling a model once and reused by every solver, env and sweep. It
holds, for L quantizable linear layers and O options:

- ``names`` (L): qualified module names, e.g. ``model.layers.3.self_attn.q_proj``;
- ``numel`` (L): weight count of each layer;
- ``tie_group`` (L): layers with the same id share an input and can be tied to one option
  (q/k/v and gate/up of one block; see :func:`tie_groups`);
- ``features`` (L x F) with ``feature_names`` and a ``feature_schema`` version string;
- ``options`` (O): quantizer settings + a label (:class:`Option`);
- ``bits`` (L x O, int64): exact stored bits of layer l under option o, or
  :data:`NOT_APPLICABLE` (-1);
- ``losses``: named L x O float matrices (``"hessian_err"``, ``"kl"``, ...), NaN where an option
  does not apply to a layer (or was not measured).

An option is usable for a layer under a loss name when its bits are not ``NOT_APPLICABLE`` and that
loss is finite (:meth:`SensitivityTable.available`).

On disk a table is one ``.npz`` file (no pickles): the arrays, plus a JSON header stored as a
uint8 array under ``header`` with the schema version, names, options, loss names, feature schema,
the :class:`TableKey` (model, corpus, samples, seqlen, code version, seed) and free metadata. It is
written atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from allocator import __version__
from allocator.errors import BitallocError
from allocator.model.arch import BLOCK_LINEARS, tie_groups
from allocator.storage import atomic_path, is_file, shown
from allocator.table.losses import HESSIAN_ERR, PREFERRED_LOSSES

FEATURES_PASS_KEY = "features_pass"
"""Metadata key that marks a features table (and holds the features pass's settings and cost)."""

TABLE_SCHEMA_VERSION = 1
NOT_APPLICABLE = -1
"""Value of ``bits[l, o]`` for an option that cannot be applied to layer ``l``."""

@dataclass(frozen=True)
class Option:
    """One candidate way to store a layer: quantizer settings (JSON-able) and a short label.

    ``settings`` follows :meth:`quantizers.Quantizer.settings` (``{"quantizer": "gptq", "bits": 3,
    "group_size": 128, ...}``); options the quantizer registry does not know yet (``billm``,
    ``keep8``, ...) are fine here, the table only needs their bits and losses.
    """

    label: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def quantizer(self) -> str:
        return str(self.settings.get("quantizer", self.label))

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Option:
        if not isinstance(data, Mapping) or not isinstance(data.get("label"), str):
            raise BitallocError(f"an option needs a string 'label', got {data!r}")
        return cls(data["label"], dict(data.get("settings") or {}))


@dataclass(frozen=True)
class TableKey:
    """What a table was measured on; two tables with equal keys are interchangeable caches."""

    model: str
    corpus: str = ""
    samples: int = 0
    seqlen: int = 0
    code_version: str = __version__
    seed: int = 0
    """Seed of the calibration sample draw."""

    def digest(self) -> str:
        """Short stable hash of the key (for cache file names)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SensitivityTable:
    """Per-layer storage bits and loss estimates for every candidate option (see the module doc)."""

    names: list[str]
    numel: np.ndarray
    tie_group: np.ndarray
    options: list[Option]
    bits: np.ndarray
    losses: dict[str, np.ndarray]
    key: TableKey
    features: np.ndarray = None  # type: ignore[assignment]  # optional: __post_init__ fills zero columns
    feature_names: list[str] = field(default_factory=list)
    feature_schema: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free JSON-able extras (loss settings, seed, timings, ...)."""

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.options = list(self.options)
        self.numel = np.asarray(self.numel, dtype=np.int64)
        self.tie_group = np.asarray(self.tie_group, dtype=np.int64)
        self.bits = np.asarray(self.bits, dtype=np.int64)
        self.losses = {str(k): np.asarray(v, dtype=np.float64) for k, v in self.losses.items()}
        length = len(self.names)
        if self.features is None:
            self.features = np.zeros((length, 0), dtype=np.float32)
        self.features = np.asarray(self.features)
        self.feature_names = list(self.feature_names)
        self.validate()

    # -- shape and consistency ------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.names)

    @property
    def num_options(self) -> int:
        return len(self.options)

    @property
    def labels(self) -> list[str]:
        return [o.label for o in self.options]

    @property
    def loss_names(self) -> list[str]:
        return list(self.losses)

    @property
    def features_only(self) -> bool:
        """Whether this table came from the features pass (:mod:`allocator.measure.features_pass`): its losses are
        cheap quantization-error features and rules, not measured sensitivities."""
        return FEATURES_PASS_KEY in self.metadata

    @property
    def total_numel(self) -> int:
        return int(self.numel.sum())

    @property
    def bpw(self) -> np.ndarray:
        """Bits per weight of every (layer, option); NaN where not applicable."""
        out = self.bits / self.numel[:, None]
        out[self.bits == NOT_APPLICABLE] = np.nan
        return out

    def validate(self) -> None:
        """Raise :class:`BitallocError` naming the first inconsistency."""
        L, O = self.num_layers, self.num_options
        if L == 0 or O == 0:
            raise BitallocError(f"a sensitivity table needs at least one layer and one option (got {L} x {O})")
        if len(set(self.names)) != L:
            dup = next(n for n in self.names if self.names.count(n) > 1)
            raise BitallocError(f"duplicate layer name in sensitivity table: {dup}")
        labels = self.labels
        if len(set(labels)) != O:
            dup = next(n for n in labels if labels.count(n) > 1)
            raise BitallocError(f"duplicate option label in sensitivity table: {dup}")
        for what, array, shape in (
            ("numel", self.numel, (L,)),
            ("tie_group", self.tie_group, (L,)),
            ("bits", self.bits, (L, O)),
        ):
            if array.shape != shape:
                raise BitallocError(f"sensitivity table {what} has shape {array.shape}, expected {shape}")
        if (self.numel <= 0).any():
            raise BitallocError(f"layer {self.names[int(np.argmax(self.numel <= 0))]} has no weights")
        if ((self.bits < 0) & (self.bits != NOT_APPLICABLE)).any():
            raise BitallocError(f"negative storage bits in sensitivity table (use {NOT_APPLICABLE} for not applicable)")
        if not self.losses:
            raise BitallocError("a sensitivity table needs at least one loss matrix")
        for name, loss in self.losses.items():
            if loss.shape != (L, O):
                raise BitallocError(f"loss {name!r} has shape {loss.shape}, expected {(L, O)}")
        if self.features.ndim != 2 or self.features.shape[0] != L:
            raise BitallocError(f"features have shape {self.features.shape}, expected ({L}, F)")
        if self.feature_names and len(self.feature_names) != self.features.shape[1]:
            raise BitallocError(f"{len(self.feature_names)} feature names for {self.features.shape[1]} feature columns")

    @property
    def default_loss(self) -> str:
        """The loss solvers minimize unless told otherwise: the first of :data:`PREFERRED_LOSSES` that
        prices every available option, else the table's first loss."""
        available = self.bits != NOT_APPLICABLE
        for name in PREFERRED_LOSSES:
            if name in self.losses and np.isfinite(self.losses[name][available]).all():
                return name
        return next(iter(self.losses))

    def loss(self, name: str | None = None) -> np.ndarray:
        """The named L x O loss matrix (:attr:`default_loss` when ``name`` is None)."""
        if name is None:
            return self.losses[self.default_loss]
        if name not in self.losses:
            raise BitallocError(f"no loss {name!r} in the sensitivity table; it has {', '.join(self.losses)}")
        return self.losses[name]

    def available(self, loss: str | None = None) -> np.ndarray:
        """L x O mask of the options usable for each layer under ``loss``."""
        return (self.bits != NOT_APPLICABLE) & np.isfinite(self.loss(loss))

    def option_index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise BitallocError(f"no option {label!r} in the sensitivity table; it has {', '.join(self.labels)}") from None

    # -- persistence ----------------------------------------------------------------------

    def header(self) -> dict[str, Any]:
        return {
            "schema_version": TABLE_SCHEMA_VERSION,
            "key": asdict(self.key),
            "names": self.names,
            "options": [o.as_dict() for o in self.options],
            "loss_names": self.loss_names,
            "feature_names": self.feature_names,
            "feature_schema": self.feature_schema,
            "metadata": self.metadata,
        }

    def save(self, path: Path | str) -> Path:
        """Write the table to one ``.npz`` file atomically; returns the path."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "header": np.frombuffer(json.dumps(self.header()).encode(), dtype=np.uint8),
            "numel": self.numel,
            "tie_group": self.tie_group,
            "bits": self.bits,
            "features": self.features,
        }
        for i, loss in enumerate(self.losses.values()):
            arrays[f"loss_{i}"] = loss
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:  # a file object: numpy appends no suffix
                np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        return path

    @classmethod
    def load(cls, path: Path | str) -> SensitivityTable:
        """Read a table written by :meth:`save` (never unpickling anything); whatever else the file
        holds (no file, not an ``.npz``, missing or mistyped arrays, a header that is not the
        expected JSON object) is a one-line :class:`BitallocError`."""
        path = Path(path)
        where = shown(path)
        if not is_file(path, "sensitivity table"):
            raise BitallocError(f"no sensitivity table at {where}")
        arrays = _read_arrays(path, where)
        if "header" not in arrays:
            raise BitallocError(f"{where} is not a bitalloc sensitivity table (no header)")
        header_array = arrays["header"]
        if header_array.dtype != np.uint8 or header_array.ndim != 1:
            raise BitallocError(f"{where}: the sensitivity table header is not JSON text")
        try:
            header = json.loads(header_array.tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise BitallocError(f"{where}: the sensitivity table header is not valid JSON") from None
        if not isinstance(header, dict):
            raise BitallocError(f"{where}: the sensitivity table header is a JSON {type(header).__name__}, not an object")
        version = header.get("schema_version")
        if version != TABLE_SCHEMA_VERSION:
            raise BitallocError(f"{where}: sensitivity table schema {version!r}, this code reads {TABLE_SCHEMA_VERSION}")
        names = _header_field(header, "names", list, where)
        loss_names = _header_field(header, "loss_names", list, where)
        options = _header_field(header, "options", list, where)
        key = _header_field(header, "key", dict, where)
        if not all(isinstance(n, str) for n in [*names, *loss_names]):
            raise BitallocError(f"{where}: layer and loss names in the header must be strings")
        numeric = {"numel": "iu", "tie_group": "iu", "bits": "iu", "features": "iuf",
                   **{f"loss_{i}": "iuf" for i in range(len(loss_names))}}
        for name, kinds in numeric.items():
            if name not in arrays:
                raise BitallocError(f"{where}: incomplete sensitivity table (no array {name!r})")
            if arrays[name].dtype.kind not in kinds:
                raise BitallocError(f"{where}: array {name!r} holds {arrays[name].dtype}, not numbers of the expected kind")
        try:
            return cls(
                names=names,
                numel=arrays["numel"],
                tie_group=arrays["tie_group"],
                options=[Option.from_dict(o) for o in options],
                bits=arrays["bits"],
                losses={name: arrays[f"loss_{i}"] for i, name in enumerate(loss_names)},
                key=TableKey(**key),
                features=arrays["features"],
                feature_names=_header_field(header, "feature_names", list, where, []),
                feature_schema=_header_field(header, "feature_schema", str, where, ""),
                metadata=_header_field(header, "metadata", dict, where, {}),
            )
        except BitallocError as exc:
            raise BitallocError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"{where}: incomplete sensitivity table ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None

    # -- synthetic tables for tests and benchmarks ----------------------------------------

    @classmethod
    def synthetic(
        cls,
        num_layers: int = 28,
        options: Sequence[Option] | None = None,
        seed: int = 0,
        hidden: int = 256,
        loss_names: Iterable[str] = (HESSIAN_ERR,),
        noise: float = 0.3,
        missing: float = 0.0,
        num_features: int = 11,
    ) -> SensitivityTable:
        """A random table shaped like a llama-style model: blocks of q, k, v, o, gate, up, down
        (cut after ``num_layers`` layers), hidden width ``hidden``, GQA k/v at a third of it and an
        MLP of 8/3 x hidden.

        Storage bits follow a simple honest-looking formula (:func:`synthetic_storage_bits`: codes +
        fp16 scale and a zero point per group, rounded up to whole bytes). Loss ``k`` of layer l under
        option o is ``a_l * 2^(-2 bpw[l, o]) * exp(noise * N(0, 1))`` with ``a_l`` log-normal times the
        layer's weight count, as BAQ models it. With ``missing > 0`` that fraction of (layer, option)
        losses is NaN (never a layer's widest option), as for options that do not apply to a layer.
        """
        rng = np.random.default_rng(seed)
        options = list(options) if options is not None else list(SYNTHETIC_OPTIONS)
        inter = int(math.ceil(hidden * 8 / 3 / 32) * 32)
        kv = max(hidden // 3 // 32 * 32, 32)
        shapes_in_block = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden), (hidden, inter)]
        block = [(local, out_f, in_f) for local, (out_f, in_f) in zip(BLOCK_LINEARS, shapes_in_block)]
        names, shapes = [], []
        for i in range(num_layers):
            local, out_f, in_f = block[i % len(block)]
            names.append(f"model.layers.{i // len(block)}.{local}")
            shapes.append((out_f, in_f))
        numel = np.array([o * i for o, i in shapes], dtype=np.int64)
        bits = np.array([[synthetic_storage_bits(opt, o, i) for opt in options] for o, i in shapes], dtype=np.int64)
        bpw = bits / numel[:, None]
        scale = rng.lognormal(0.0, 1.0, size=num_layers) * numel / numel.mean()
        losses = {}
        widest = np.argmax(bits, axis=1)
        for name in loss_names:
            loss = scale[:, None] * np.exp2(-2.0 * bpw) * np.exp(noise * rng.standard_normal(bits.shape))
            if missing > 0:
                drop = rng.random(bits.shape) < missing
                drop[np.arange(num_layers), widest] = False
                loss[drop] = np.nan
            losses[name] = loss
        features = rng.standard_normal((num_layers, num_features)).astype(np.float32)
        return cls(
            names=names,
            numel=numel,
            tie_group=tie_groups(names),
            options=options,
            bits=bits,
            losses=losses,
            key=TableKey(model=f"synthetic-{num_layers}x{len(options)}-seed{seed}", corpus="synthetic"),
            features=features,
            feature_names=[f"f{j}" for j in range(num_features)],
            feature_schema="synthetic-v1",
            metadata={"synthetic": True, "seed": seed, "noise": noise, "missing": missing},
        )


def _read_arrays(path: Path, where: str) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``, read with pickles refused; a file that is not such an
    archive, or whose members are not ``.npy`` arrays, is a one-line :class:`BitallocError`."""
    if not zipfile.is_zipfile(path):
        empty = " (the file is empty)" if path.stat().st_size == 0 else ""
        raise BitallocError(f"cannot read sensitivity table {where}: not an .npz archive{empty}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "pickled" in reason:  # numpy's advice to allow pickles is not one bitalloc takes
            reason = "it holds pickled objects, which bitalloc never loads"
        raise BitallocError(f"cannot read sensitivity table {where}: {reason}") from None


def _header_field(header: Mapping[str, Any], name: str, kind: type, where: str, default: Any = None) -> Any:
    """``header[name]`` if it has the JSON type ``kind`` (``default`` when missing and one is given)."""
    if name not in header:
        if default is not None:
            return default
        raise BitallocError(f"{where}: incomplete sensitivity table (no {name!r} in the header)")
    value = header[name]
    if not isinstance(value, kind):
        raise BitallocError(f"{where}: the header's {name!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value


SYNTHETIC_OPTIONS: tuple[Option, ...] = (
    Option("billm", {"quantizer": "billm"}),
    Option("gptq-w2g128", {"quantizer": "gptq", "bits": 2, "group_size": 128}),
    Option("gptq-w3g128", {"quantizer": "gptq", "bits": 3, "group_size": 128}),
    Option("gptq-w4g128", {"quantizer": "gptq", "bits": 4, "group_size": 128}),
    Option("keep8", {"quantizer": "rtn", "bits": 8, "group_size": None, "symmetric": True}),
)
"""Default options of :meth:`SensitivityTable.synthetic` (about 1.2, 2.3, 3.3, 4.3 and 8 bpw)."""

_BINARY_OVERHEAD = 0.1
"""Synthetic 1-bit family: extra bits per weight for salient columns / masks."""


def synthetic_storage_bits(option: Option, out_features: int, in_features: int) -> int:
    """Approximate stored bits of a synthetic option on an ``out x in`` weight (whole bytes).

    Uniform grids: ``bits`` per weight + per group an fp16 scale and, unless symmetric, a
    ``bits``-wide zero point. 1-bit options without ``bits``: 1 bit per weight + 10% for salient
    weights and masks + two fp16 scales per row. Only for synthetic tables; real tables take the
    quantizers' exact bits.
    """
    settings = option.settings
    numel = out_features * in_features
    if "bits" not in settings:
        raw = numel + math.ceil(_BINARY_OVERHEAD * numel) + out_features * 32
    else:
        b = int(settings["bits"])
        group = settings.get("group_size") or in_features
        groups = math.ceil(in_features / group) * out_features
        zero = 0 if settings.get("symmetric") else b
        raw = b * numel + groups * (16 + zero)
    return 8 * math.ceil(raw / 8)

