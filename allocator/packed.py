"""The packed quantized model on disk: what ``bitalloc quantize`` writes and ``eval --quantized`` reads.

A directory with two files, written atomically as a whole:

- ``quantized.safetensors``: every stored tensor of every quantized linear
  (:attr:`quantizers.QuantizedTensor.stored`: packed codes, scales, masks, ...) under the key
  ``<module>.<tensor name>``, e.g. ``model.layers.0.self_attn.q_proj.codes``;
- ``quantization_config.json`` (``schema_version`` 1)::

      {"schema_version": 1, "format": "bitalloc-packed", "model": "smollm2-135m",
       "bpw": 2.49, "total_bits": 123400, "total_bytes": 15425, "model_bytes": 123456789,
       "source": {...},                   # the bit map's solver, budget and predicted loss
       "modules": {"model.layers.0.self_attn.q_proj":
                     {"format": "uniform_grid", "shape": [576, 576], "meta": {...},
                      "quantizer": {"quantizer": "gptq", "bits": 3, ...}, "option": "gptq-w3g128",
                      "storage_bits": 1032192, "tensors": ["codes", "scales", "zeros"]}, ...}}

``bpw``, ``total_bits`` and ``total_bytes`` count the quantized linears (as a bit map does);
``model_bytes`` is the whole model with every other tensor at float16
(:func:`allocator.accounting.model_size_bytes`). The weights of the rest of the model are not
copied: they are the reference model's, loaded from ``model``.

:func:`load_quantized` rebuilds every :class:`~quantizers.QuantizedTensor` from the stored tensors
alone (:func:`quantizers.formats.decode`) and checks their sizes against the config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from torch import nn

from allocator.apply import QuantizedModel
from allocator.errors import BitallocError
from allocator.storage import atomic_path
from quantizers import QuantizedTensor
from quantizers.formats import DECODERS, decode

PACKED_SCHEMA_VERSION = 1
PACKED_FORMAT = "bitalloc-packed"
TENSORS_FILE = "quantized.safetensors"
CONFIG_FILE = "quantization_config.json"


@dataclass
class PackedModel:
    """A packed quantized model read back: the quantized linears and the config."""

    model: str
    """The reference model the rest of the weights come from (a spec for :func:`allocator.models.load_model`)."""
    quantized: QuantizedModel
    config: dict[str, Any] = field(default_factory=dict)


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
    if directory.exists() and not directory.is_dir():
        raise BitallocError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / CONFIG_FILE).is_file():
        raise BitallocError(f"{directory} is a non-empty directory that is not a bitalloc packed model; not overwriting it")
    if not quantized.tensors:
        raise BitallocError("nothing to save: no quantized modules")
    missing = sorted(set(quantized.tensors) - set(quantizer_settings))
    if missing:
        raise BitallocError(f"no quantizer settings for {missing[0]}")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    for name, qt in quantized.tensors.items():
        for tensor_name, tensor in qt.stored.items():
            tensors[f"{name}.{tensor_name}"] = tensor.detach().contiguous().cpu()
        modules[name] = {
            "format": qt.format,
            "shape": list(qt.shape),
            "meta": qt.meta,
            "quantizer": dict(quantizer_settings[name]),
            "option": (options or {}).get(name, ""),
            "storage_bits": qt.storage_bits,
            "tensors": list(qt.stored),
        }
    config = {
        "schema_version": PACKED_SCHEMA_VERSION,
        "format": PACKED_FORMAT,
        "model": model,
        "bpw": quantized.bits_per_weight,
        "total_bits": quantized.storage_bits,
        "total_bytes": math.ceil(quantized.storage_bits / 8),
        "model_bytes": model_bytes,
        "source": dict(source or {}),
        "modules": modules,
    }
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        safetensors.torch.save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": PACKED_FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_quantized(directory: Path | str) -> PackedModel:
    """Read a packed directory back; every problem is a one-line :class:`BitallocError`."""
    directory = Path(directory)
    config_path, tensors_path = directory / CONFIG_FILE, directory / TENSORS_FILE
    if not directory.is_dir():
        raise BitallocError(f"no packed quantized model at {directory}")
    if not config_path.is_file() or not tensors_path.is_file():
        raise BitallocError(f"{directory} is not a packed quantized model (needs {CONFIG_FILE} and {TENSORS_FILE})")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BitallocError(f"cannot read {config_path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict) or config.get("format") != PACKED_FORMAT:
        raise BitallocError(f"{config_path} is not a bitalloc packed model config")
    if config.get("schema_version") != PACKED_SCHEMA_VERSION:
        raise BitallocError(f"{config_path}: packed schema {config.get('schema_version')!r}, this code reads {PACKED_SCHEMA_VERSION}")
    try:
        stored_all = safetensors.torch.load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise BitallocError(f"cannot read {tensors_path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    modules = config.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise BitallocError(f"{config_path}: no modules")
    quantized = QuantizedModel()
    for name, entry in modules.items():
        try:
            fmt, shape, meta, names = entry["format"], tuple(int(x) for x in entry["shape"]), entry["meta"], entry["tensors"]
        except (KeyError, TypeError, ValueError):
            raise BitallocError(f"{config_path}: incomplete entry for {name}") from None
        if fmt not in DECODERS:
            raise BitallocError(f"{config_path}: {name} has unknown format {fmt!r}")
        missing = [t for t in names if f"{name}.{t}" not in stored_all]
        if missing:
            raise BitallocError(f"{tensors_path} lacks tensor {name}.{missing[0]}")
        stored = {t: stored_all[f"{name}.{t}"] for t in names}
        qt = QuantizedTensor(fmt, (shape[0], shape[1]), stored, meta, dequantized=torch.empty(0))
        if qt.storage_bits != entry.get("storage_bits"):
            raise BitallocError(f"{name}: stored tensors hold {qt.storage_bits} bits, the config says {entry.get('storage_bits')}")
        try:
            qt.dequantized = decode(qt)
        except (RuntimeError, ValueError, KeyError, IndexError) as exc:
            raise BitallocError(f"cannot decode {name}: {str(exc).splitlines()[0]}") from None
        if tuple(qt.dequantized.shape) != qt.shape:
            raise BitallocError(f"{name} decodes to shape {tuple(qt.dequantized.shape)}, expected {qt.shape}")
        quantized.tensors[name] = qt
    if quantized.storage_bits != config.get("total_bits"):
        raise BitallocError(f"{config_path}: total_bits {config.get('total_bits')} != {quantized.storage_bits} from the modules")
    return PackedModel(model=str(config.get("model", "")), quantized=quantized, config=config)


def check_matches(quantized: QuantizedModel, linears: Mapping[str, nn.Linear], what: str) -> None:
    """Every quantized module must be a linear of the model with the same weight shape."""
    for name, qt in quantized.tensors.items():
        if name not in linears:
            raise BitallocError(f"{what}: {name} is not a quantizable linear of this model")
        shape = tuple(linears[name].weight.shape)
        if shape != qt.shape:
            raise BitallocError(f"{what}: {name} has shape {qt.shape}, the model's is {shape}")
