"""The packed quantized model on disk: what ``bitalloc quantize`` writes and ``eval --quantized`` reads.

A directory with two files (:data:`PACKED_FILES`), written atomically: a new directory is renamed into
place whole; in an existing packed directory the two files are replaced and any other file stays:

- ``quantized.safetensors``: every stored tensor of every quantized linear
  (:attr:`quantizers.QuantizedTensor.stored`: packed codes, scales, masks, ...) under the key
  ``<module>.<tensor name>``, e.g. ``model.layers.0.self_attn.q_proj.codes``;
- ``quantization_config.json`` (``schema_version`` 1, or 2 with a transform, see below)::

      {"schema_version": 1, "format": "bitalloc-packed", "model": "smollm2-135m",
       "bpw": 2.49, "total_bits": 123400, "total_bytes": 15425, "model_bytes": 123456789,
       "source": {...},                   # the bit map's solver, budget and predicted loss
       "modules": {"model.layers.0.self_attn.q_proj":
                     {"format": "uniform_grid", "shape": [576, 576], "meta": {...},
                      "quantizer": {"quantizer": "gptq", "bits": 3, ...}, "option": "gptq-w3g128",
                      "storage_bits": 1032192, "tensors": ["codes", "scales", "zeros"]}, ...}}

``bpw``, ``total_bits`` and ``total_bytes`` count the quantized linears (as a bit map does);
``model_bytes`` is the whole model with every other tensor at float16
(:func:`allocator.evaluate.accounting.model_size_bytes`). The weights of the rest of the model are not
copied: they are the reference model's, loaded from ``model``.

Schema 2 adds what a function-preserving transform of the reference (scale folding,
:mod:`allocator.quantize.scalefold`) changed outside the quantized linears. ``quantized.safetensors`` then
also holds each such float tensor as ``<module>.weight`` (float32, e.g. the folded
``model.layers.0.input_layernorm.weight``) and each fold's scales as ``scale_fold/<source module>``
(float32), and the config gains::

      "float_tensors": {"model.layers.0.input_layernorm": {"shape": [576], "dtype": "float32"}, ...},
      "scale_fold": {"settings": {"version": 1, "alpha": 0.5},
                     "groups": [{"block": 0, "source": "model.layers.0.input_layernorm",
                                 "targets": ["model.layers.0.self_attn.q_proj", ...], "alpha": 0.5,
                                 "tensor": "scale_fold/model.layers.0.input_layernorm"}, ...]}

Schema 3 adds a quantized LM head (:mod:`allocator.quantize.head`), outside the bit map and outside
``bpw``/``total_bits``: its stored tensors go into ``quantized.safetensors`` like a module's, and
the config gains ``"head": {"lm_head": {<a module entry>}}``; ``model_bytes`` counts it.

A model is written with the lowest schema that holds it (1 without transform or head), so readers
of the older schemas keep reading what they can; this code reads all three.

:func:`load_quantized` rebuilds every :class:`~quantizers.QuantizedTensor` from the stored tensors
alone (:func:`quantizers.formats.decode`) and checks their sizes against the config.

:func:`load_quantized_model` goes one step further and puts the packed weights into the model so it
runs (generates, evaluates) on them: uniform-grid layers of 1-4 or 8 bits (RTN, GPTQ, XNOR) become
:class:`quantizers.kernels.QuantLinear` modules computed by the packed-weight CPU kernels; the other
stored formats (BiLLM, PB-LLM, dynamic grouping, W(1+1)) have no kernel yet and run as their
dequantized float weights. :func:`quantized_from_modules` reads the packed weights back out of such a
model, for :func:`save_quantized`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from allocator.errors import BitallocError
from allocator.model.layers import quantizable_linears
from allocator.model.loading import LoadedModel, load_model
from allocator.quantize.apply import QuantizedModel
from allocator.quantize.head import head_name
from allocator.quantize.scalefold import ScaleFold
from allocator.storage import atomic_path, check_output_dir, is_dir, is_file, read_json, shown
from allocator.table.bitmap import BitMap, ModuleEntry, SolverRecord
from allocator.table.options import quantizer_from_settings
from quantizers import QuantizedTensor
from quantizers.formats import DECODERS, UNIFORM_GRID, decode
from quantizers.kernels import KERNEL_BITS, QuantLinear

PACKED_SCHEMA_VERSION = 3
"""The newest schema this code writes and reads (it writes the lowest one that holds the model)."""
READABLE_SCHEMAS = (1, 2, 3)
PACKED_FORMAT = "bitalloc-packed"
TENSORS_FILE = "quantized.safetensors"
CONFIG_FILE = "quantization_config.json"
PACKED_FILES = (TENSORS_FILE, CONFIG_FILE)
"""What a packed directory holds; replacing one replaces these and leaves any other file alone."""

KERNEL = "kernel"
"""How :func:`install_quantized` runs a module: packed, through the low-bit kernels ..."""
DEQUANTIZED = "dequantized"
"""... or as its dequantized float weight (formats without a kernel)."""


@dataclass
class PackedModel:
    """A packed quantized model read back: the quantized linears and the config."""

    model: str
    """The reference model the rest of the weights come from (a spec for :func:`allocator.model.loading.load_model`)."""
    quantized: QuantizedModel
    config: dict[str, Any] = field(default_factory=dict)

    def bitmap(self) -> BitMap:
        """The allocation this model was quantized by: each module's option and quantizer settings."""
        modules = {}
        for name, entry in self.config["modules"].items():
            qt = self.quantized.tensors[name]
            modules[name] = ModuleEntry(option=str(entry.get("option", "")), settings=dict(entry["quantizer"]),
                                        storage_bits=qt.storage_bits, numel=qt.numel)
        source = self.config.get("source") or {}
        return BitMap(model=self.model, modules=modules, predicted_loss=float(source.get("predicted_loss") or 0.0),
                      loss_name=str(source.get("loss_name", "")), solver=SolverRecord(str(source.get("solver", "packed"))),
                      budget=dict(source.get("budget") or {}), table_key=str(source.get("table_key", "")))


def bitmap_source(bitmap: BitMap, bitmap_ref: str, calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The ``source`` record of a packed model quantized by ``bitmap`` (saved as ``bitmap_ref``) on ``calibration``."""
    return {
        "bitmap": bitmap_ref,
        "solver": bitmap.solver.name,
        "budget": bitmap.budget,
        "loss_name": bitmap.loss_name,
        "predicted_loss": bitmap.predicted_loss,
        "table_key": bitmap.table_key,
        "calibration": dict(calibration),
    }


def save_quantized(
    directory: Path | str,
    model: str,
    quantized: QuantizedModel,
    quantizer_settings: Mapping[str, Mapping[str, Any]],
    options: Mapping[str, str] | None = None,
    model_bytes: int | None = None,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``quantized`` as a packed directory (replacing an earlier packed one at that path).

    ``quantizer_settings``/``options`` give each module's quantizer settings and option label;
    ``source`` records where the allocation came from (solver, budget, ...).
    """
    directory = Path(directory)
    check_packed_target(directory, "packed model")
    if not quantized.tensors:
        raise BitallocError("nothing to save: no quantized modules")
    missing = sorted(set(quantized.tensors) - set(quantizer_settings))
    if missing:
        raise BitallocError(f"no quantizer settings for {missing[0]}")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for name, qt in quantized.tensors.items():
        modules[name] = _module_entry(qt, tensors, name, dict(quantizer_settings[name]), (options or {}).get(name, ""))
    head: dict[str, Any] = {}
    for name, qt in quantized.head.items():
        if name in quantized.tensors:
            raise BitallocError(f"{name} is both a quantized linear and the quantized head")
        # the only head quantizer is allocator.quantize.head's round to nearest
        head[name] = _module_entry(qt, tensors, name, {"quantizer": "rtn", **qt.meta}, "")
    float_tensors: dict[str, Any] = {}
    for name, weight in quantized.float_weights.items():
        if name in quantized.tensors:
            raise BitallocError(f"{name} is both quantized and a float override")
        tensors[f"{name}.weight"] = weight.detach().float().contiguous().cpu()
        float_tensors[name] = {"shape": list(weight.shape), "dtype": "float32"}
    fold = quantized.scale_fold
    if fold is not None:
        tensors.update({key: t.cpu() for key, t in fold.tensors().items()})
    transformed = bool(float_tensors) or fold is not None
    config = {
        "schema_version": 3 if head else 2 if transformed else 1,
        "format": PACKED_FORMAT,
        "model": model,
        "bpw": quantized.bits_per_weight,
        "total_bits": quantized.storage_bits,
        "total_bytes": math.ceil(quantized.storage_bits / 8),
        "model_bytes": model_bytes,
        "source": dict(source or {}),
        "modules": modules,
    }
    if transformed or head:
        config["float_tensors"] = float_tensors
        config["scale_fold"] = fold.to_json() if fold is not None else None
    if head:
        config["head"] = head
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        safetensors.torch.save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": PACKED_FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def check_packed_target(directory: Path, what: str) -> None:
    """Refuse, before any work, a packed-model output bitalloc could not write or must not touch: what
    :func:`allocator.storage.check_output_dir` refuses, and a non-empty directory that is not a packed
    model (a packed model is replaced file by file, so its other files stay; any other directory is the
    user's)."""
    directory = Path(directory)
    check_output_dir(directory, what, files=PACKED_FILES)
    if is_dir(directory, what) and any(directory.iterdir()) and not is_file(directory / CONFIG_FILE, what):
        raise BitallocError(f"{what} {shown(directory)} is a non-empty directory that is not a bitalloc packed model; not overwriting it")


def _module_entry(qt: QuantizedTensor, tensors: dict[str, torch.Tensor], name: str, quantizer: dict[str, Any], option: str) -> dict[str, Any]:
    """Add ``qt``'s stored tensors to ``tensors`` under ``<name>.<tensor>`` and return its config entry."""
    for tensor_name, tensor in qt.stored.items():
        tensors[f"{name}.{tensor_name}"] = tensor.detach().contiguous().cpu()
    return {
        "format": qt.format,
        "shape": list(qt.shape),
        "meta": qt.meta,
        "quantizer": quantizer,
        "option": option,
        "storage_bits": qt.storage_bits,
        "tensors": list(qt.stored),
    }


def _read_module(name: str, entry: Any, stored_all: Mapping[str, torch.Tensor], config_path: Path, tensors_path: Path) -> QuantizedTensor:
    """One module entry of the config and its stored tensors back as a decoded :class:`QuantizedTensor`."""
    try:
        fmt, shape, meta, names = entry["format"], tuple(int(x) for x in entry["shape"]), entry["meta"], entry["tensors"]
    except (KeyError, TypeError, ValueError):
        raise BitallocError(f"{config_path}: incomplete entry for {name}") from None
    if len(shape) != 2 or min(shape) <= 0 or not isinstance(meta, dict) or not isinstance(names, list) \
            or not all(isinstance(t, str) for t in names):
        raise BitallocError(f"{config_path}: malformed entry for {name} (shape, meta or tensors)")
    if fmt not in DECODERS:
        raise BitallocError(f"{config_path}: {name} has unknown format {fmt!r}")
    missing = [t for t in names if f"{name}.{t}" not in stored_all]
    if missing:
        raise BitallocError(f"{tensors_path} lacks tensor {name}.{missing[0]}")
    stored = {t: stored_all[f"{name}.{t}"] for t in names}
    qt = QuantizedTensor(fmt, (shape[0], shape[1]), stored, meta, dequantized=torch.empty(0))
    try:  # both read meta (bits, group size, ...) that may be anything in a damaged config
        storage_bits = qt.storage_bits
        if storage_bits != entry.get("storage_bits"):
            raise BitallocError(f"{name}: stored tensors hold {storage_bits} bits, the config says {entry.get('storage_bits')}")
        qt.dequantized = decode(qt)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError, ZeroDivisionError) as exc:
        raise BitallocError(f"{config_path}: cannot decode {name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if tuple(qt.dequantized.shape) != qt.shape:
        raise BitallocError(f"{name} decodes to shape {tuple(qt.dequantized.shape)}, expected {qt.shape}")
    return qt


def load_quantized(directory: Path | str) -> PackedModel:
    """Read a packed directory back; every problem is a one-line :class:`BitallocError`."""
    directory = Path(directory)
    config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    if not is_dir(directory, "packed model"):
        raise BitallocError(f"no packed quantized model at {shown(directory)}")
    if not is_file(config_path, "packed model") or not is_file(tensors_path, "packed model"):
        raise BitallocError(f"{shown(directory)} is not a packed quantized model (needs {CONFIG_FILE} and {TENSORS_FILE})")
    config = read_json(config_path, "packed model config")
    if not isinstance(config, dict) or config.get("format") != PACKED_FORMAT:
        raise BitallocError(f"{config_path} is not a bitalloc packed model config")
    if config.get("schema_version") not in READABLE_SCHEMAS:
        raise BitallocError(f"{config_path}: packed schema {config.get('schema_version')!r}, this code reads "
                            f"{' and '.join(map(str, READABLE_SCHEMAS))}")
    try:
        stored_all = safetensors.torch.load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise BitallocError(f"cannot read {tensors_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    modules = config.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise BitallocError(f"{config_path}: no modules")
    quantized = QuantizedModel()
    for name, entry in modules.items():
        quantized.tensors[name] = _read_module(name, entry, stored_all, config_path, tensors_path)
        # the settings are what export --quantized and the bit map of the model read: they must build
        if not isinstance(entry.get("quantizer"), Mapping):
            raise BitallocError(f"{config_path}: {name} has no quantizer settings")
        try:
            quantizer_from_settings(entry["quantizer"])
        except BitallocError as exc:
            raise BitallocError(f"{config_path}: {name}: {exc}") from None
    if config.get("schema_version", 1) >= 3:
        head = config.get("head") or {}
        if not isinstance(head, dict):
            raise BitallocError(f"{config_path}: head is not a mapping")
        for name, entry in head.items():
            if name in quantized.tensors:
                raise BitallocError(f"{config_path}: {name} is both a quantized module and the head")
            quantized.head[name] = _read_module(name, entry, stored_all, config_path, tensors_path)
    _load_transform(config, stored_all, quantized, config_path, tensors_path)
    if quantized.storage_bits != config.get("total_bits"):
        raise BitallocError(f"{config_path}: total_bits {config.get('total_bits')} != {quantized.storage_bits} from the modules")
    return PackedModel(model=str(config.get("model", "")), quantized=quantized, config=config)


def _load_transform(config: Mapping[str, Any], stored_all: Mapping[str, torch.Tensor], quantized: QuantizedModel,
                    config_path: Path, tensors_path: Path) -> None:
    """Schema 2: put the float overrides and the scale-fold record into ``quantized``."""
    if config.get("schema_version", 1) < 2:
        return
    float_tensors = config.get("float_tensors") or {}
    if not isinstance(float_tensors, dict):
        raise BitallocError(f"{config_path}: float_tensors is not a mapping")
    for name, entry in float_tensors.items():
        key = f"{name}.weight"
        if key not in stored_all:
            raise BitallocError(f"{tensors_path} lacks tensor {key}")
        tensor = stored_all[key]
        if not isinstance(entry, dict) or list(tensor.shape) != entry.get("shape"):
            raise BitallocError(f"{config_path}: {key} has shape {list(tensor.shape)}, the config says {entry!r}")
        quantized.float_weights[name] = tensor.float()
    if config.get("scale_fold") is not None:
        quantized.scale_fold = ScaleFold.from_json(config["scale_fold"], stored_all)


def check_float_weights(quantized: QuantizedModel, model: nn.Module, what: str) -> None:
    """Every float override (and the quantized head) must replace the weight of a module of the model, with its shape."""
    modules = dict(model.named_modules())
    for name in quantized.head:
        if name != head_name(model):
            raise BitallocError(f"{what}: {name} is not this model's LM head ({head_name(model)})")
    replaced = {**quantized.float_weights, **{name: qt.dequantized for name, qt in quantized.head.items()}}
    for name, weight in replaced.items():
        own = getattr(modules.get(name), "weight", None)
        if not isinstance(own, torch.Tensor):
            raise BitallocError(f"{what}: {name} is not a module with a weight in this model")
        if tuple(own.shape) != tuple(weight.shape):
            raise BitallocError(f"{what}: {name} has shape {tuple(weight.shape)}, the model's is {tuple(own.shape)}")


def check_matches(quantized: QuantizedModel, linears: Mapping[str, nn.Linear], what: str) -> None:
    """Every quantized module must be a linear of the model with the same weight shape."""
    for name, qt in quantized.tensors.items():
        if name not in linears:
            raise BitallocError(f"{what}: {name} is not a quantizable linear of this model")
        shape = tuple(linears[name].weight.shape)
        if shape != qt.shape:
            raise BitallocError(f"{what}: {name} has shape {qt.shape}, the model's is {shape}")


@dataclass
class RunnableQuantized:
    """A packed model loaded to run: the model (with :class:`QuantLinear` modules), the packed
    form it came from, and how each quantized module runs (:data:`KERNEL` or :data:`DEQUANTIZED`)."""

    loaded: LoadedModel
    packed: PackedModel
    kinds: dict[str, str]


def runs_on_kernels(qt: QuantizedTensor) -> bool:
    """Whether the low-bit kernels compute with this stored format (uniform grid, 1-4 or 8 bits)."""
    return qt.format == UNIFORM_GRID and int(qt.meta.get("bits", 0)) in KERNEL_BITS


def install_quantized(model: nn.Module, quantized: QuantizedModel) -> dict[str, str]:
    """Put ``quantized`` into ``model`` in place so that the model runs on it.

    Kernel formats (:func:`runs_on_kernels`) replace their ``nn.Linear`` by a :class:`QuantLinear`
    holding only the packed weight (and the linear's bias); other formats overwrite the linear's
    weight with their dequantized float weight. A quantized LM head is installed the same way (a
    tied input embedding keeps its float weight). Returns module name -> :data:`KERNEL` or
    :data:`DEQUANTIZED`.
    """
    linears = quantizable_linears(model)
    check_matches(quantized, linears, "install_quantized")
    if quantized.head:
        head = head_name(model)
        for name, qt in quantized.head.items():
            if name != head or tuple(model.get_output_embeddings().weight.shape) != qt.shape:
                raise BitallocError(f"install_quantized: {name} {qt.shape} is not this model's LM head")
        linears = {**linears, head: model.get_output_embeddings()}
    modules = dict(model.named_modules())
    kinds: dict[str, str] = {}
    for name, qt in {**quantized.tensors, **quantized.head}.items():
        linear = linears[name]
        if runs_on_kernels(qt):
            bias = None if linear.bias is None else linear.bias.detach().float()
            parent, _, child = name.rpartition(".")
            setattr(modules[parent], child, QuantLinear.from_quantized(qt, bias))
            kinds[name] = KERNEL
        else:
            linear.weight = nn.Parameter(qt.dequantized.to(linear.weight.dtype), requires_grad=False)
            kinds[name] = DEQUANTIZED
    return kinds


def load_quantized_model(directory: Path | str, loaded: LoadedModel | None = None) -> RunnableQuantized:
    """Read a packed directory and install it into its reference model, ready to generate/evaluate.

    ``loaded`` defaults to :func:`allocator.model.loading.load_model` of the model the config names; a
    ``loaded`` passed in is modified in place. Its perplexity equals the simulated (dequantized)
    model's up to float summation order.
    """
    packed = load_quantized(directory)
    if loaded is None:
        if not packed.model:
            raise BitallocError(f"{directory}: the config names no model; pass the model to load into")
        loaded = load_model(packed.model)
    kinds = install_quantized(loaded.model, packed.quantized)
    return RunnableQuantized(loaded=loaded, packed=packed, kinds=kinds)


def quantized_from_modules(model: nn.Module) -> QuantizedModel:
    """The stored form of every :class:`QuantLinear` in ``model``, by qualified name (for :func:`save_quantized`)."""
    result = QuantizedModel()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            (result.head if module is output else result.tensors)[name] = module.to_quantized()
    return result
