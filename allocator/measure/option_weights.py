"""The quantized weights a profile made: every (layer, option), kept to build any bit map cheaply.

While profiling, every option quantizes every layer alone on the reference inputs; those weights
are what the table's losses describe. Keeping them makes any allocation over the same table a lookup instead of a
calibration run: ``bitalloc pareto`` evaluates whole sweeps of bit maps this way, the single-layer KL and Fisher losses
are measured from them, and the environment's measured-KL backend swaps them into the reference model.

Each layer is one safetensors file holding every option's **stored form** (packed codes, scales, ...: the bytes a packed
model stores, so the cache costs the options' honest bits, about 13 bits per weight for ``bitalloc run``'s five
options instead of 80 as fp16) and, in the file's metadata, how to decode each (format, shape, meta). A weight is
decoded on use (:func:`quantizers.formats.decode`, bit-identical to what the quantizer returned). Files written before
this format (one fp16 tensor per option label) are still read.

These "one-shot" models differ from ``bitalloc quantize`` in one respect: there, GPTQ-family
quantizers see the already-quantized prefix (sequential, as in GPTQ); here every layer saw the
reference inputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from allocator.errors import BitallocError
from allocator.storage import atomic_path
from quantizers import QuantizedTensor
from quantizers.formats import decode

SUFFIX = ".weights"
FORMAT_KEY = "bitalloc_option_weights"
FORMAT = "stored-1"
"""The file metadata that marks a layer file as stored forms (absent: the older fp16 dequantized weights)."""


class OptionWeights:
    """A directory of ``<layer>.safetensors`` files, each holding one fp16 tensor per option label."""

    def __init__(self, directory: Path, labels: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.labels = list(labels)

    @classmethod
    def beside(cls, table_path: Path, labels: Sequence[str]) -> OptionWeights:
        """The weights kept beside the table at ``table_path`` (``<table>.weights/``)."""
        return cls(Path(table_path).with_suffix(SUFFIX), labels)

    def path(self, layer: str) -> Path:
        return self.directory / f"{layer}.safetensors"

    def has(self, layer: str) -> bool:
        return self.path(layer).is_file()

    def missing(self, layers: Sequence[str]) -> list[str]:
        return [layer for layer in layers if not self.has(layer)]

    def save(self, layer: str, quantized: Mapping[str, QuantizedTensor]) -> None:
        """Write one layer's options (label -> quantized tensor) atomically, as their stored forms."""
        if sorted(quantized) != sorted(self.labels):
            raise ValueError(f"{layer}: expected weights for {self.labels}, got {sorted(quantized)}")
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"{label}/{name}": t.detach().contiguous().cpu() for label, qt in quantized.items() for name, t in qt.stored.items()}
        entries = {label: {"format": qt.format, "shape": list(qt.shape), "meta": qt.meta, "tensors": list(qt.stored)}
                   for label, qt in quantized.items()}
        with atomic_path(self.path(layer)) as tmp:
            save_file(tensors, str(tmp), metadata={FORMAT_KEY: FORMAT, "entries": json.dumps(entries, sort_keys=True)})

    def load(self, layer: str, label: str) -> torch.Tensor:
        """One (layer, option) weight as float32."""
        if label not in self.labels:
            raise BitallocError(f"option {label!r} is not in this profile ({', '.join(self.labels)})")
        if not self.has(layer):
            raise BitallocError(f"no kept weights for {layer} in {self.directory} (profile again with weights kept)")
        path = self.path(layer)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get(FORMAT_KEY) != FORMAT:
                    return handle.get_tensor(label).float()  # a cache written before the stored forms
                entry = json.loads(metadata["entries"])[label]
                stored = {name: handle.get_tensor(f"{label}/{name}") for name in entry["tensors"]}
            qt = QuantizedTensor(entry["format"], (int(entry["shape"][0]), int(entry["shape"][1])), stored, entry["meta"],
                                 dequantized=torch.empty(0))
            return decode(qt).float()
        except (SafetensorError, KeyError, OSError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise BitallocError(f"unreadable kept weights {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None

    def assemble(self, assignment: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """Module name -> float32 weight for an assignment of module name -> option label."""
        missing = self.missing(list(assignment))
        if missing:
            raise BitallocError(
                f"{len(missing)} layers have no kept weights in {self.directory} (first: {missing[0]}); "
                "run bitalloc profile again (it keeps them by default)"
            )
        return {layer: self.load(layer, label) for layer, label in assignment.items()}
