"""The bit map: which option every quantized module gets, what that costs, and who decided it.

JSON layout (``schema_version`` 1)::

    {"schema_version": 1, "model": "...", "table_key": "...",
     "loss_name": "hessian_err", "budget": {"kind": "bpw", "value": 2.5, "bits": 123456},
     "predicted_bpw": 2.49, "total_bits": 123400, "total_bytes": 15425, "predicted_loss": 0.031,
     "solver": {"name": "ilp", "settings": {...}, "seconds": 0.012, "info": {...}},
     "modules": {"model.layers.0.self_attn.q_proj":
                   {"option": "gptq-w3g128",
                    "settings": {"quantizer": "gptq", "bits": 3, "group_size": 128},
                    "storage_bits": 12345, "numel": 4096}, ...}}

``total_bits`` / ``total_bytes`` / ``predicted_bpw`` count the quantized modules only (the rest of
the model is reported beside them by :mod:`allocator.evaluate.accounting`). Loading checks that they agree
with the per-module entries.

Two renderers turn a bit map into another tool's input: :func:`llama_cpp_tensor_types` (the
``--tensor-type`` overrides of ``llama-quantize``) and :func:`gptqmodel_dynamic` (GPTQModel's
per-module ``dynamic`` config).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from allocator.errors import BitallocError
from allocator.storage import write_json

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
    seconds: float = 0.0
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

    def assignment(self) -> dict[str, dict[str, Any]]:
        """Module name -> quantizer settings (what :mod:`allocator.quantize.apply` needs)."""
        return {name: dict(e.settings) for name, e in self.modules.items()}

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
            "solver": {
                "name": self.solver.name,
                "settings": self.solver.settings,
                "seconds": self.solver.seconds,
                "info": self.solver.info,
            },
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
        bitmap = cls(
            model=str(data["model"]),
            modules=modules,
            predicted_loss=_number(data["predicted_loss"], "predicted_loss", source),
            loss_name=str(data["loss_name"]),
            solver=SolverRecord(
                name=solver_raw["name"],
                settings=dict(solver_raw.get("settings") or {}),
                seconds=_number(solver_raw.get("seconds", 0.0), "solver.seconds", source),
                info=dict(solver_raw.get("info") or {}),
            ),
            budget=dict(data.get("budget") or {}),
            table_key=str(data.get("table_key", "")),
        )
        if "total_bits" in data and data["total_bits"] != bitmap.total_bits:
            raise BitallocError(f"{source}: total_bits {data['total_bits']} != sum of module storage bits {bitmap.total_bits}")
        if "total_bytes" in data and data["total_bytes"] != bitmap.total_bytes:
            raise BitallocError(f"{source}: total_bytes {data['total_bytes']} != {bitmap.total_bytes} from the modules")
        if "predicted_bpw" in data:
            bpw = _number(data["predicted_bpw"], "predicted_bpw", source)
            if not math.isclose(bpw, bitmap.predicted_bpw, rel_tol=1e-9, abs_tol=1e-12):
                raise BitallocError(f"{source}: predicted_bpw {bpw} != {bitmap.predicted_bpw} from the modules")
        return bitmap

    def save(self, path: Path | str) -> Path:
        """Write the bit map as JSON, atomically."""
        path = Path(path)
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: Path | str) -> BitMap:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise BitallocError(f"no bit map at {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BitallocError(f"cannot read bit map {path}: {str(exc).splitlines()[0]}") from None
        return cls.from_json(data, source=str(path))


def _number(value: Any, what: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BitallocError(f"{source}: {what} must be a number, got {value!r}")
    return float(value)


def _parse_entry(name: str, entry: Any, source: str) -> ModuleEntry:
    if not isinstance(entry, Mapping):
        raise BitallocError(f"{source}: module {name} must map to an object")
    settings = entry.get("settings")
    if not isinstance(settings, Mapping) or "quantizer" not in settings:
        raise BitallocError(f"{source}: module {name} needs 'settings' with a 'quantizer'")
    option = entry.get("option")
    if not isinstance(option, str):
        raise BitallocError(f"{source}: module {name} needs a string 'option' label")
    bits, numel = entry.get("storage_bits"), entry.get("numel")
    for what, value, low in (("storage_bits", bits, 0), ("numel", numel, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise BitallocError(f"{source}: module {name} has invalid {what} {value!r}")
    return ModuleEntry(option=option, settings=dict(settings), storage_bits=bits, numel=numel)


# -- renderers ------------------------------------------------------------------------------

BINARY_QUANTIZERS = frozenset({"billm", "pbllm", "xnor", "binary", "dyngroup", "w11", "w1p1"})
"""Quantizers of the 1-bit family (their ``bits`` setting, if any, is not a uniform grid width)."""

FLOAT_QUANTIZERS = frozenset({"none", "float", "fp16", "keep"})
"""Settings that leave the weight in float16."""

GGML_TYPES: dict[str, str] = {
    "1bit": "iq1_s",
    "2": "q2_k",
    "3": "q3_k",
    "4": "q4_k",
    "5": "q5_k",
    "6": "q6_k",
    "8": "q8_0",
    "16": "f16",
}
"""Option -> llama.cpp ggml type, by the option's code width: the 1-bit family
(:data:`BINARY_QUANTIZERS`, or ``bits == 1``) -> ``iq1_s``; a uniform grid of ``bits`` -> the K-quant
of that width (8 -> ``q8_0``); float (:data:`FLOAT_QUANTIZERS`) -> ``f16``. The mapping is by width,
not by exact format: llama.cpp requantizes with its own block layout, and for rows that are not a
multiple of 256 (SmolLM2, Gemma3) it falls back to 32-block types and ignores the override."""

GGUF_TENSOR_NAMES: dict[str, str] = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
"""Module path inside a decoder block (HF llama/qwen/gemma naming) -> GGUF tensor name."""

_BLOCK_MODULE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


GGML_QUANTIZER = "ggml"
"""Quantizer name of GGUF-native options (:mod:`allocator.gguf.native_profile`): ``{"quantizer": "ggml", "type": "q3_k"}``."""


def is_ggml_native(bitmap: BitMap) -> bool:
    """Whether ``bitmap`` names llama.cpp types (a GGUF-native map) rather than bitalloc quantizers."""
    return any(e.settings.get("quantizer") == GGML_QUANTIZER for e in bitmap.modules.values())


def ggml_type(settings: Mapping[str, Any]) -> str:
    """The llama.cpp type for an option (see :data:`GGML_TYPES`)."""
    quantizer = str(settings.get("quantizer", ""))
    if quantizer == GGML_QUANTIZER:  # a GGUF-native option names its type
        return str(settings["type"])
    bits = settings.get("bits")
    if quantizer in BINARY_QUANTIZERS or bits == 1:
        return GGML_TYPES["1bit"]
    if quantizer in FLOAT_QUANTIZERS and bits in (None, 16):
        return GGML_TYPES["16"]
    if str(bits) not in GGML_TYPES:
        raise BitallocError(f"no llama.cpp type for option settings {dict(settings)}")
    return GGML_TYPES[str(bits)]


def gguf_tensor_name(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``."""
    match = _BLOCK_MODULE.match(module)
    if not match or match.group(2) not in GGUF_TENSOR_NAMES:
        raise BitallocError(f"no GGUF tensor name for module {module}")
    return f"blk.{match.group(1)}.{GGUF_TENSOR_NAMES[match.group(2)]}"


def llama_cpp_tensor_types(bitmap: BitMap) -> list[str]:
    """One ``PATTERN=TYPE`` override per module, e.g. ``blk\\.3\\.attn_q\\.weight=q3_k``.

    llama-quantize matches each pattern with ``std::regex_search`` against tensor names (last match
    wins), so the dots are escaped and the ``.weight`` suffix keeps ``blk.1`` from matching
    ``blk.10``. Pass each line after ``--tensor-type`` (:func:`llama_cpp_args`) or write them one per
    line to a ``--tensor-type-file``.
    """
    lines = []
    for module, entry in bitmap.modules.items():
        pattern = re.escape(gguf_tensor_name(module) + ".weight")
        lines.append(f"{pattern}={ggml_type(entry.settings)}")
    return lines


def llama_cpp_args(bitmap: BitMap) -> list[str]:
    """``["--tensor-type", "blk\\.0\\.attn_q\\.weight=q4_k", ...]`` for a llama-quantize argv."""
    args: list[str] = []
    for line in llama_cpp_tensor_types(bitmap):
        args += ["--tensor-type", line]
    return args


def gptqmodel_dynamic(bitmap: BitMap) -> dict[str, dict[str, Any]]:
    """GPTQModel ``QuantizeConfig(dynamic=...)``: ``"+:<escaped module name>$" -> {"bits", "group_size"}``
    (``group_size`` -1 for one group per row, ``sym`` when the option sets it); float options become
    ``"-:<name>$": {}`` (skip quantization). GPTQModel matches the keys with ``re.match``. Options
    GPTQModel cannot store (the 1-bit family) raise :class:`BitallocError`."""
    dynamic: dict[str, dict[str, Any]] = {}
    for module, entry in bitmap.modules.items():
        settings = entry.settings
        pattern = re.escape(module) + "$"
        quantizer = str(settings.get("quantizer", ""))
        bits = settings.get("bits")
        if quantizer in FLOAT_QUANTIZERS and bits in (None, 16):
            dynamic[f"-:{pattern}"] = {}
            continue
        if quantizer in BINARY_QUANTIZERS or not isinstance(bits, int) or bits not in (2, 3, 4, 8):
            raise BitallocError(f"GPTQModel cannot store option {entry.option!r} of {module} (bits 2, 3, 4 or 8 only)")
        group = settings.get("group_size")
        override: dict[str, Any] = {"bits": bits, "group_size": -1 if group is None else int(group)}
        if "symmetric" in settings:
            override["sym"] = bool(settings["symmetric"])
        dynamic[f"+:{pattern}"] = override
    return dynamic
