"""The bit map: which option every quantized module gets, what that costs, and who decided it.

JSON layout (``schema_version`` 1)::

    {"schema_version": 1, "model": "...", "table_key": "...",
     "loss_name": "hessian_err", "budget": {"kind": "bpw", "value": 2.5, "bits": 123456},
     "predicted_bpw": 2.49, "total_bits": 123400, "total_bytes": 15425, "predicted_loss": 0.031,
     "solver": {"name": "ilp", "settings": {...}, "info": {...}},
     "modules": {"model.layers.0.self_attn.q_proj":
                   {"option": "gptq-w3g128",
                    "settings": {"quantizer": "gptq", "bits": 3, "group_size": 128},
                    "storage_bits": 12345, "numel": 4096}, ...}}

``total_bits`` / ``total_bytes`` / ``predicted_bpw`` count the quantized modules only (the rest of
the model is reported beside them by :mod:`allocator.evaluate.accounting`). Loading checks that they agree
with the per-module entries, that the modules fit the bit map's own ``budget`` and that the predicted
loss is a finite number.

The file holds no wall-clock values, so that same-seed runs write the same bytes: the solver's time is
printed by ``bitalloc solve``, not saved (files written before that have ``solver.seconds``, which is
still read).

Two renderers turn a bit map into another tool's input: :func:`llama_cpp_tensor_types` (the
``--tensor-type`` overrides of ``llama-quantize``) and :func:`gptqmodel_dynamic` (GPTQModel's
per-module ``dynamic`` config).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from allocator.errors import BitallocError
from allocator.storage import read_json, shown, write_json
from allocator.table.assignment import Assignment

BITMAP_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModuleEntry:
    """The option chosen for one module."""

    option: str
    """Label of the option in the sensitivity table (``gptq-w3g128``)."""
    settings: dict[str, Any]
    """Quantizer settings (``{"quantizer": "gptq", "bits": 3, "group_size": 128, ...}``)."""
    storage_bits: int
    numel: int

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / self.numel


@dataclass(frozen=True)
class SolverRecord:
    """Which solver produced a bit map, how it was configured and how long it took."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = field(default=0.0, compare=False)
    """Wall-clock time of the solve: kept in memory only (see the module doc), and no part of what a bit
    map is (two equal allocations are equal whatever they took)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Solver-specific results (status, LP bound, Lagrange multiplier, ...)."""


@dataclass(frozen=True)
class BitMap:
    """Module name -> chosen option, with the predicted size and loss of the whole allocation."""

    model: str
    modules: dict[str, ModuleEntry]
    predicted_loss: float
    loss_name: str
    solver: SolverRecord
    budget: dict[str, Any] = field(default_factory=dict)
    table_key: str = ""

    @property
    def total_bits(self) -> int:
        return sum(e.storage_bits for e in self.modules.values())

    @property
    def total_numel(self) -> int:
        return sum(e.numel for e in self.modules.values())

    @property
    def total_bytes(self) -> int:
        return math.ceil(self.total_bits / 8)

    @property
    def predicted_bpw(self) -> float:
        return self.total_bits / max(self.total_numel, 1)

    def options(self) -> dict[str, str]:
        """Module name -> option label."""
        return {name: e.option for name, e in self.modules.items()}

    def assignment(self) -> Assignment:
        """Module name -> quantizer settings (what :mod:`allocator.quantize.apply` applies)."""
        return Assignment({name: e.settings for name, e in self.modules.items()})

    # -- JSON -------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": BITMAP_SCHEMA_VERSION,
            "model": self.model,
            "table_key": self.table_key,
            "loss_name": self.loss_name,
            "budget": self.budget,
            "predicted_bpw": self.predicted_bpw,
            "total_bits": self.total_bits,
            "total_bytes": self.total_bytes,
            "predicted_loss": self.predicted_loss,
            "solver": {"name": self.solver.name, "settings": self.solver.settings, "info": self.solver.info},
            "modules": {
                name: {"option": e.option, "settings": e.settings, "storage_bits": e.storage_bits, "numel": e.numel}
                for name, e in self.modules.items()
            },
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "bit map") -> BitMap:
        """Parse and check a bit map; any problem is a one-line :class:`BitallocError`."""
        if not isinstance(data, Mapping):
            raise BitallocError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version != BITMAP_SCHEMA_VERSION:
            raise BitallocError(f"{source}: bit map schema {version!r}, this code reads {BITMAP_SCHEMA_VERSION}")
        for key in ("model", "modules", "predicted_loss", "loss_name", "solver"):
            if key not in data:
                raise BitallocError(f"{source}: missing field {key!r}")
        modules_raw = data["modules"]
        if not isinstance(modules_raw, Mapping) or not modules_raw:
            raise BitallocError(f"{source}: 'modules' must be a non-empty object")
        modules = {}
        for name, entry in modules_raw.items():
            modules[name] = _parse_entry(name, entry, source)
        solver_raw = data["solver"]
        if not isinstance(solver_raw, Mapping) or not isinstance(solver_raw.get("name"), str):
            raise BitallocError(f"{source}: 'solver' must be an object with a 'name'")
        budget = data.get("budget")
        if budget is None:
            budget = {}
        if not isinstance(budget, Mapping):
            raise BitallocError(f"{source}: 'budget' must be an object (kind, value, bits), got {budget!r}")
        bitmap = cls(
            model=_text(data["model"], "model", source),
            modules=modules,
            predicted_loss=_finite(data["predicted_loss"], "predicted_loss", source),
            loss_name=_text(data["loss_name"], "loss_name", source),
            solver=SolverRecord(
                name=solver_raw["name"],
                settings=_object(solver_raw.get("settings"), "solver.settings", source),
                seconds=_number(solver_raw.get("seconds", 0.0), "solver.seconds", source),  # files before it was dropped
                info=_object(solver_raw.get("info"), "solver.info", source),
            ),
            budget=dict(budget),
            table_key=_text(data.get("table_key", ""), "table_key", source),
        )
        if "total_bits" in data and data["total_bits"] != bitmap.total_bits:
            raise BitallocError(f"{source}: total_bits {data['total_bits']} != sum of module storage bits {bitmap.total_bits}")
        if "total_bytes" in data and data["total_bytes"] != bitmap.total_bytes:
            raise BitallocError(f"{source}: total_bytes {data['total_bytes']} != {bitmap.total_bytes} from the modules")
        if "predicted_bpw" in data:
            bpw = _finite(data["predicted_bpw"], "predicted_bpw", source)
            if not math.isclose(bpw, bitmap.predicted_bpw, rel_tol=1e-9, abs_tol=1e-12):
                raise BitallocError(f"{source}: predicted_bpw {bpw} != {bitmap.predicted_bpw} from the modules")
        _check_budget(bitmap, source)
        return bitmap

    def save(self, path: Path | str) -> Path:
        """Write the bit map as JSON, atomically."""
        path = Path(path)
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: Path | str) -> BitMap:
        path = Path(path)
        return cls.from_json(read_json(path, "bit map"), source=shown(path))


def _number(value: Any, what: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BitallocError(f"{source}: {what} must be a number, got {value!r}")
    return float(value)


def _finite(value: Any, what: str, source: str) -> float:
    """A number that is not NaN or infinite (Python's JSON reader accepts both)."""
    number = _number(value, what, source)
    if not math.isfinite(number):
        raise BitallocError(f"{source}: {what} must be a finite number, got {value!r}")
    return number


def _text(value: Any, what: str, source: str) -> str:
    if not isinstance(value, str):
        raise BitallocError(f"{source}: {what} must be a string, got {value!r}")
    return value


def _object(value: Any, what: str, source: str) -> dict[str, Any]:
    """An optional JSON object (missing or null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BitallocError(f"{source}: {what} must be an object, got {value!r}")
    return dict(value)


BUDGET_KINDS = ("bpw", "bytes")


def _check_budget(bitmap: BitMap, source: str) -> None:
    """The modules must fit the budget the bit map records (``bits``, else ``kind``/``value``): a map
    over its own budget was edited or made by something that is not a solver."""
    budget = bitmap.budget
    if not budget:
        return
    kind = budget.get("kind")
    if kind is not None and kind not in BUDGET_KINDS:
        raise BitallocError(f"{source}: budget kind {kind!r} is not one of {', '.join(BUDGET_KINDS)}")
    limit: int | None = None
    if "bits" in budget:
        limit = _count(budget["bits"], "bits", 0, f"{source}: budget")
    elif "value" in budget and kind is not None:
        value = _finite(budget["value"], "budget.value", source)
        other = _count(budget.get("other_bytes", 0), "other_bytes", 0, f"{source}: budget")
        # as allocator.solvers.Budget.max_bits counts it (decimal arithmetic for bpw)
        limit = math.floor(Fraction(repr(value)) * bitmap.total_numel) if kind == "bpw" else 8 * (math.floor(value) - other)
    if limit is not None and bitmap.total_bits > limit:
        raise BitallocError(f"{source}: the modules store {bitmap.total_bits} bits ({bitmap.predicted_bpw:.4f} bpw), "
                            f"more than the bit map's own budget of {limit} bits")


def _parse_entry(name: str, entry: Any, source: str) -> ModuleEntry:
    if not isinstance(entry, Mapping):
        raise BitallocError(f"{source}: module {name} must map to an object")
    settings = entry.get("settings")
    if not isinstance(settings, Mapping) or "quantizer" not in settings:
        raise BitallocError(f"{source}: module {name} needs 'settings' with a 'quantizer'")
    option = entry.get("option")
    if not isinstance(option, str):
        raise BitallocError(f"{source}: module {name} needs a string 'option' label")
    bits = _count(entry.get("storage_bits"), "storage_bits", 0, f"{source}: module {name}")
    numel = _count(entry.get("numel"), "numel", 1, f"{source}: module {name}")
    return ModuleEntry(option=option, settings=dict(settings), storage_bits=bits, numel=numel)


def _count(value: Any, what: str, low: int, where: str) -> int:
    """``value`` if it is an integer (not a bool) of at least ``low``, else a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BitallocError(f"{where} has invalid {what} {value!r}")
    return value


# -- renderers ------------------------------------------------------------------------------


